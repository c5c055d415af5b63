"""W3C Trace Context across HTTP and Kafka, with spans seen by the SDK's in-memory exporter.

The bridge runs in-process on the real broker; its `Tracing` is given a tracer provider
whose exporter keeps spans in memory, as `OTEL_*` variables would give it an OTLP one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from bridge.consume.consumer import GenerationConsumer
from bridge.delivery.topics import create_topics
from bridge.ops.tracing import Tracing
from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.helpers import SEED_COMPLETED_VIDEO, callback_url, read_topic

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    yield memory
    memory.clear()


def exporting(exporter: InMemorySpanExporter, *, trusted: bool) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(tracer_provider=provider, trusted_proxies=LOOPBACK if trusted else ())


@asynccontextmanager
async def bridge_with(settings: Settings, tracing: Tracing) -> AsyncIterator[BridgeServer]:
    await create_topics(settings)
    server = BridgeServer(settings, registry=CollectorRegistry(), tracing=tracing)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


async def post_with_traceparent(server: BridgeServer) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(callback_url(server), json=SEED_COMPLETED_VIDEO, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()


async def record_trace_headers(settings: Settings) -> list[dict[str, str]]:
    found = []
    for topic in ("completed", "lifecycle"):
        (record,) = await read_topic(
            settings.kafka_bootstrap_servers, f"{settings.topic_prefix}.{topic}", expected=1
        )
        headers = {name: value.decode() for name, value in record.headers}
        found.append({k: v for k, v in headers.items() if k in ("traceparent", "tracestate")})
    return found


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def test_a_trusted_traceparent_is_continued_into_spans_and_records(
    settings: Settings, exporter: InMemorySpanExporter
) -> None:
    async with bridge_with(settings, exporting(exporter, trusted=True)) as server:
        await post_with_traceparent(server)

    spans = by_name(exporter.get_finished_spans())
    assert {"luma callback", "validate", "kafka produce"} <= set(spans), list(spans)
    request = spans["luma callback"]
    assert hex_id(request.context.trace_id, 32) == TRACE_ID
    assert request.parent is not None
    assert hex_id(request.parent.span_id, 16) == PARENT_ID
    for child in ("validate", "kafka produce"):
        parent = spans[child].parent
        assert parent is not None
        assert parent.span_id == request.context.span_id
    expected = f"00-{TRACE_ID}-{hex_id(request.context.span_id, 16)}-01"
    assert (
        await record_trace_headers(settings)
        == [{"traceparent": expected, "tracestate": "vendor=abc"}] * 2
    )

    # The consumer side continues the same trace from the record (the bridge's provider
    # shut down with it; a service has its own).
    async with GenerationConsumer(settings=settings, group_id=None, states=["completed"]) as events:
        event = await anext(events)
    service_spans = InMemorySpanExporter()
    service = TracerProvider()
    service.add_span_processor(SimpleSpanProcessor(service_spans))
    tracer = service.get_tracer("downstream")
    with tracer.start_as_current_span("handle generation", context=event.trace_context()):
        pass
    (handled,) = service_spans.get_finished_spans()
    assert hex_id(handled.context.trace_id, 32) == TRACE_ID
    assert handled.parent is not None
    assert handled.parent.span_id == request.context.span_id


async def test_a_stranger_gets_a_new_root_that_links_to_its_context(
    settings: Settings, exporter: InMemorySpanExporter
) -> None:
    async with bridge_with(settings, exporting(exporter, trusted=False)) as server:
        await post_with_traceparent(server)

    request = by_name(exporter.get_finished_spans())["luma callback"]
    assert request.parent is None
    assert hex_id(request.context.trace_id, 32) != TRACE_ID
    (link,) = request.links
    assert hex_id(link.context.trace_id, 32) == TRACE_ID
    assert hex_id(link.context.span_id, 16) == PARENT_ID
    (headers, _) = await record_trace_headers(settings)
    assert headers["traceparent"].split("-")[1] == hex_id(request.context.trace_id, 32)
    assert "tracestate" not in headers  # the stranger's vendor state is not carried either


@pytest.mark.parametrize(("trusted", "carried"), [(True, True), (False, False)])
async def test_with_export_off_only_a_trusted_traceparent_is_carried_as_it_came(
    settings: Settings, trusted: bool, carried: bool
) -> None:
    tracing = Tracing(trusted_proxies=LOOPBACK if trusted else ())
    async with bridge_with(settings, tracing) as server:
        await post_with_traceparent(server)
    expected: dict[str, Any] = (
        {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"} if carried else {}
    )
    assert await record_trace_headers(settings) == [expected] * 2
