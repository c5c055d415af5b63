"""Trace export is switched by the standard OTEL_* variables; the drain links its batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bridge.ops.tracing import Tracing, TracingUnavailable, build_tracing
from bridge.settings import OtelSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)


def test_export_is_off_unless_an_otel_variable_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not build_tracing(OtelSettings()).exporting
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not build_tracing(OtelSettings()).exporting
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    console = build_tracing(OtelSettings())
    assert console.exporting
    console.shutdown()
    console.shutdown()  # safe twice


def test_an_otlp_endpoint_turns_export_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "bridge-under-test")
    tracing = build_tracing(OtelSettings())
    try:
        assert tracing.exporting
        provider = tracing._provider
        assert provider.resource.attributes["service.name"] == "bridge-under-test"
    finally:
        tracing.shutdown()


def test_an_unknown_exporter_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(TracingUnavailable, match="otlp, console or none"):
        build_tracing(OtelSettings())


def test_the_drain_span_is_a_root_linked_to_each_records_callback() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing = Tracing(tracer_provider=provider)
    records = [
        SimpleNamespace(headers=[("traceparent", f"00-{TRACE_ID}-{n:016x}-01".encode())])
        for n in range(1, 4)
    ] + [SimpleNamespace(headers=[("luma-state", b"queued")])]
    with tracing.drain_span(records):
        pass
    (drain,) = spans.get_finished_spans()
    assert drain.name == "spool drain"
    assert drain.parent is None
    assert [link.context.span_id for link in drain.links] == [1, 2, 3]
    assert {format(link.context.trace_id, "032x") for link in drain.links} == {TRACE_ID}


def test_trust_is_the_direct_peer_in_trusted_proxies() -> None:
    from ipaddress import ip_network

    tracing = Tracing(trusted_proxies=(ip_network("10.0.0.0/8"),))
    assert tracing.is_trusted("10.1.2.3")
    assert not tracing.is_trusted("192.0.2.1")
    assert not tracing.is_trusted(None)
    assert not tracing.is_trusted("not an address")
    assert not Tracing().is_trusted("10.1.2.3")
