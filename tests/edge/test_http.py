"""The HTTP edge and pipeline with an in-memory publisher: statuses, duplicates, limits, metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import ipaddress
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp.web_protocol
import pytest
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from bridge.contract.callback import Topics
from bridge.delivery.dedupe import DedupeWindow
from bridge.delivery.pipeline import Pipeline
from bridge.edge.auth import Authenticator, TokenAuth
from bridge.edge.http import CallbackHandler, create_app
from bridge.edge.limits import Phase
from bridge.ops.metrics import Metrics
from bridge.ops.tracing import Tracing
from bridge.server import callback_app
from tests.edge.support import (
    RawAnswer,
    edge_settings,
    read_answer,
    request_bytes,
    running_edge,
    send_raw,
)
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN, MemoryPublisher, wait_until

PATH = f"/luma/callback/{TOKEN}"


@dataclass
class Edge:
    client: TestClient[Any, Any]
    publisher: MemoryPublisher
    metrics: Metrics

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


async def make_edge(**options: Any) -> Edge:
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    pipeline = Pipeline(
        publisher=publisher,
        topics=Topics("t"),
        metrics=metrics,
        ack_timeout=options.get("ack_timeout", 1.0),
        lifecycle=options.get("lifecycle", True),
        dedupe=DedupeWindow(size=100, ttl=60),
    )
    handler = CallbackHandler(
        pipeline=pipeline,
        auth=Authenticator(TokenAuth((TOKEN.encode(),), allow_unauthenticated=False)),
        metrics=metrics,
        max_body_bytes=4096,
        max_inflight=options.get("max_inflight", 100),
    )
    app = create_app(
        handler=handler, metrics=metrics, callback_path="/luma/callback", max_body_bytes=4096
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    return Edge(client, publisher, metrics)


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    made = await make_edge()
    try:
        yield made
    finally:
        await made.client.close()


async def post(edge: Edge, body: object, path: str = PATH) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await edge.client.post(path, data=data, headers={"Content-Type": "application/json"})
    return response.status, await response.json()


async def test_accepted_callback_writes_per_state_and_lifecycle_records(edge: Edge) -> None:
    status, answer = await post(edge, SEED_COMPLETED_VIDEO)
    assert status == 200
    assert answer["status"] == "accepted"
    assert [r.topic for r in edge.publisher.records] == ["t.completed", "t.lifecycle"]
    assert edge.sample("luma_bridge_callbacks_total", state="completed", outcome="accepted") == 1
    assert edge.sample("luma_bridge_callback_duration_seconds_count", outcome="accepted") == 1
    assert (
        edge.sample("luma_bridge_generation_age_seconds_count", state="completed", model="none")
        == 1
    )


async def test_lifecycle_topic_can_be_turned_off() -> None:
    edge = await make_edge(lifecycle=False)
    try:
        await post(edge, SEED_COMPLETED_VIDEO)
        assert [r.topic for r in edge.publisher.records] == ["t.completed"]
    finally:
        await edge.client.close()


async def test_a_redelivery_after_success_is_answered_200_without_a_second_write(
    edge: Edge,
) -> None:
    first = await post(edge, SEED_COMPLETED_VIDEO)
    second = await post(edge, SEED_COMPLETED_VIDEO)
    assert second[0] == 200
    assert second[1]["event_id"] == first[1]["event_id"]
    assert second[1]["duplicate"] is True
    assert len(edge.publisher.records) == 2
    assert edge.sample("luma_bridge_duplicate_deliveries_total", state="completed") == 1
    assert edge.sample("luma_bridge_callbacks_total", state="completed", outcome="duplicate") == 1


async def test_a_redelivery_while_the_first_is_in_flight_waits_for_its_outcome(
    edge: Edge,
) -> None:
    edge.publisher.gate = asyncio.Event()
    first = asyncio.create_task(post(edge, SEED_COMPLETED_VIDEO))
    await wait_until(lambda: edge.publisher.calls == 1, what="first write started")
    second = asyncio.create_task(post(edge, SEED_COMPLETED_VIDEO))
    await wait_until(
        lambda: edge.sample("luma_bridge_inflight_requests") == 2, what="both in flight"
    )
    edge.publisher.gate.set()
    assert (await first)[0] == 200
    status, answer = await second
    assert (status, answer.get("duplicate")) == (200, True)
    assert edge.sample("luma_bridge_duplicate_deliveries_total", state="completed") == 1
    assert edge.publisher.calls == 1
    assert len(edge.publisher.records) == 2


async def test_kafka_unavailable_gives_503_with_retry_after(edge: Edge) -> None:
    edge.publisher.failing = "KafkaTimeoutError"
    response = await edge.client.post(PATH, json=SEED_COMPLETED_VIDEO)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["status"] == "unavailable"
    edge.publisher.failing = None
    assert (await post(edge, SEED_COMPLETED_VIDEO))[0] == 200  # nothing remembered the failure


async def test_an_invalid_body_is_dead_lettered_once_however_often_it_is_retried(
    edge: Edge,
) -> None:
    for _ in range(4):
        status, answer = await post(edge, b'{"id": 5}')
        assert (status, answer["status"]) == (400, "invalid")
    assert [r.topic for r in edge.publisher.records] == ["t.deadletter"]
    assert edge.publisher.records[0].value == b'{"id": 5}'
    assert edge.sample("luma_bridge_deadletters_total", reason="schema") == 1
    assert edge.sample("luma_bridge_callbacks_total", state="none", outcome="invalid") == 4


async def test_beyond_the_inflight_bound_callbacks_are_shed_with_503() -> None:
    edge = await make_edge(max_inflight=1)
    try:
        edge.publisher.gate = asyncio.Event()
        first = asyncio.create_task(post(edge, SEED_COMPLETED_VIDEO))
        await wait_until(lambda: edge.publisher.calls == 1, what="first write started")
        status, answer = await post(edge, {**SEED_COMPLETED_VIDEO, "id": "other"})
        assert answer == {
            "status": "unavailable",
            "error": "too many callbacks in flight; retry later",
        }
        assert status == 503
        assert edge.sample("luma_bridge_shed_total", reason="inflight_limit") == 1
        edge.publisher.gate.set()
        assert (await first)[0] == 200
    finally:
        await edge.client.close()


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", "/luma/callback/wrong", {}, b"{}", 401),
        ("POST", "/luma/callback", {}, b"{}", 401),
        ("POST", "/other", {}, b"{}", 404),
        ("PUT", PATH, {}, b"{}", 405),
        ("POST", PATH, {"Content-Type": "text/csv"}, b"{}", 415),
        ("POST", PATH, {"Content-Type": "application/json"}, b"x" * 5000, 413),
        ("POST", PATH, {"Content-Type": "application/json"}, b"{", 400),
        ("POST", PATH, {"Content-Type": "application/problem+json"}, b"[]", 400),
    ],
)
async def test_every_status_has_a_json_body(
    edge: Edge, method: str, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    response = await edge.client.request(method, path, data=body, headers=headers)
    assert response.status == status
    answer = await response.json()
    assert set(answer) == {"status", "error"}
    assert TOKEN not in json.dumps(answer)
    if status == 401:
        assert edge.publisher.records == []
    assert (
        sum(
            edge.sample("luma_bridge_callbacks_total", state="none", outcome=outcome)
            for outcome in ("unauthorized", "rejected", "invalid")
        )
        == 1
    )


async def test_a_callback_without_a_content_type_is_taken_as_json(edge: Edge) -> None:
    # README: "no Content-Type at all is taken as JSON"; Luma's requests must not fail on it.
    response = await edge.client.post(
        PATH, data=json.dumps(SEED_COMPLETED_VIDEO).encode(), skip_auto_headers=["Content-Type"]
    )
    assert "Content-Type" not in response.request_info.headers
    assert response.status == 200
    assert [r.topic for r in edge.publisher.records] == ["t.completed", "t.lifecycle"]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/cloudevents+json", 200),
        ("text/x+json", 415),
        ("application/jsonl", 415),
        ("application/x-json-stream", 415),
        ("text/json", 415),
        ("application/octet-stream", 415),
    ],
)
async def test_json_media_types_are_accepted_and_others_refused(
    edge: Edge, content_type: str, status: int
) -> None:
    response = await edge.client.post(
        PATH, data=json.dumps(SEED_COMPLETED_VIDEO).encode(), headers={"Content-Type": content_type}
    )
    assert response.status == status
    assert len(edge.publisher.records) == (2 if status == 200 else 0)


async def test_a_method_not_allowed_names_the_allowed_one_and_a_missing_route_does_not(
    edge: Edge,
) -> None:
    response = await edge.client.put(PATH, data=b"{}")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    response = await edge.client.post("/elsewhere", data=b"{}")
    assert response.status == 404
    assert "Allow" not in response.headers


def callback_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fields = [
        dict(getattr(record, "fields", {}))
        for record in caplog.records
        if record.name == "bridge.edge.http" and record.getMessage() == "callback"
    ]
    for line in fields:
        assert line.pop("latency_ms") >= 0
    return fields


async def test_each_callback_is_logged_once_with_a_masked_path(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.edge.http")
    response = await edge.client.post(
        PATH + "?token=also-secret", json={**SEED_COMPLETED_VIDEO, "id": "g1"}
    )
    event_id = (await response.json())["event_id"]
    await edge.client.post("/luma/callback", json=SEED_COMPLETED_VIDEO)
    await edge.client.post(PATH, data=b"{", headers={"Content-Type": "application/json"})
    assert callback_lines(caplog) == [
        {
            "outcome": "accepted",
            "status": 200,
            "path": "/luma/callback/***?***",
            "source": "127.0.0.1",
            "event_id": event_id,
            "generation_id": "g1",
            "state": "completed",
            "records": ["t.completed/0@0", "t.lifecycle/0@1"],
        },
        {
            "outcome": "unauthorized",
            "status": 401,
            "path": "/luma/callback",
            "source": "127.0.0.1",
            "reason": "missing or wrong credentials",
        },
        {
            "outcome": "invalid",
            "status": 400,
            "path": "/luma/callback/***",
            "source": "127.0.0.1",
            "reason": "body is not valid UTF-8 JSON",
            "records": ["t.deadletter/0@2"],
        },
    ]


async def test_nothing_is_logged_per_callback_below_info(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.edge.http")
    assert (await edge.client.post(PATH, json=SEED_COMPLETED_VIDEO)).status == 200
    assert callback_lines(caplog) == []


# The body: its size bound at the edge, its deadline, and a sender that goes away.


async def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_refused() -> None:
    async with running_edge(max_body_bytes=4096) as listener:
        document = {**SEED_COMPLETED_VIDEO, "pad": ""}
        padding = 4096 - len(json.dumps(document).encode())
        exact = json.dumps({**document, "pad": "a" * padding}).encode()
        assert len(exact) == 4096
        assert (await send_raw(listener.port, request_bytes(body=exact))).status == 200
        over = request_bytes(body=b"", headers={"Content-Length": "4097"})  # body never sent
        answer = await send_raw(listener.port, over, timeout=3)
        assert answer.status == 413
        assert json.loads(answer.body) == {
            "status": "rejected",
            "error": "body larger than 4096 bytes",
        }


async def test_a_body_that_stalls_past_the_deadline_is_answered_408() -> None:
    async with running_edge(body_timeout=0.3) as listener:
        full = request_bytes()
        answer = await send_raw(listener.port, full[:-10], timeout=5)
        assert answer.status == 408
        assert json.loads(answer.body) == {
            "status": "rejected",
            "error": "body not received in time",
        }
        assert listener.sample("luma_bridge_callbacks_total", state="none", outcome="rejected") == 1


async def test_a_body_cut_off_by_the_connection_closing_is_counted_as_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.edge.http")
    async with running_edge(max_connections=1, body_timeout=30) as listener:
        _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(request_bytes()[:-5])  # authenticated, body not finished
        await wait_until(
            lambda: [h.phase for h in listener.site.guard.connections()] == [Phase.READING],
            what="the body being read",
        )
        # A newcomer: the slow body is closed to make room, and its read fails.
        assert (await send_raw(listener.port, request_bytes())).status == 200
        await wait_until(lambda: len(callback_lines(caplog)) == 2, what="both callbacks answered")
        writer.close()
    cut_off = [line for line in callback_lines(caplog) if line["outcome"] == "rejected"]
    assert cut_off == [
        {
            "outcome": "rejected",
            "status": 400,
            "path": "/luma/callback/***",
            "source": "127.0.0.1",
            "reason": "connection closed before the body was received",
        }
    ]


async def test_the_inflight_bound_counts_every_callback_in_flight_and_frees_each_slot() -> None:
    edge = await make_edge(max_inflight=2)
    try:
        for n in range(3):  # answered one after the other: each frees its slot
            assert (await post(edge, {**SEED_COMPLETED_VIDEO, "id": f"done-{n}"}))[0] == 200
        assert edge.sample("luma_bridge_inflight_requests") == 0
        edge.publisher.gate = asyncio.Event()
        held = [
            asyncio.create_task(post(edge, {**SEED_COMPLETED_VIDEO, "id": f"held-{n}"}))
            for n in range(2)
        ]
        await wait_until(lambda: edge.publisher.calls == 5, what="two callbacks in flight")
        assert (await post(edge, {**SEED_COMPLETED_VIDEO, "id": "third"}))[0] == 503
        edge.publisher.gate.set()
        assert [(await task)[0] for task in held] == [200, 200]
        assert edge.sample("luma_bridge_inflight_requests") == 0
    finally:
        await edge.client.close()


async def test_refusals_before_the_pipeline_say_why(edge: Edge) -> None:
    response = await edge.client.post(PATH, data=b"{}", headers={"Content-Type": "text/csv"})
    assert (response.status, await response.json()) == (
        415,
        {"status": "rejected", "error": "content type must be application/json"},
    )
    # Without a signature to check, the body of an unauthenticated request is never read.
    big = request_bytes(path="/luma/callback/wrong", body=b"", headers={"Content-Length": "99999"})
    async with running_edge() as listener:
        assert (await send_raw(listener.port, big, timeout=3)).status == 401


async def test_a_streamed_body_over_the_limit_is_refused(edge: Edge) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 1000  # 5000 bytes in all, over the 4096 of this edge

    response = await edge.client.post(
        PATH, data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 413
    assert edge.publisher.records == []


async def test_the_logged_latency_is_the_observed_answer_time_in_milliseconds(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.edge.http")
    # Kafka acknowledges 50 ms after the send: long enough that a latency off by a
    # thousandth shows in the milliseconds' third decimal.
    edge.publisher.gate = gate = asyncio.Event()

    async def acknowledge_later() -> None:
        await wait_until(lambda: edge.publisher.calls == 1, timeout=10)
        await asyncio.sleep(0.05)
        gate.set()

    acknowledging = asyncio.create_task(acknowledge_later())
    assert (await edge.client.post(PATH, json=SEED_COMPLETED_VIDEO)).status == 200
    await acknowledging
    (record,) = [r for r in caplog.records if r.getMessage() == "callback"]
    seconds = edge.sample("luma_bridge_callback_duration_seconds_sum", outcome="accepted")
    assert 0.05 <= seconds < 60
    assert record.__dict__["fields"]["latency_ms"] == round(seconds * 1000, 3)


# Bodies that come after the head, in chunks (the streamed path of `_read_body`), and the
# global body budget they reserve as they grow. The budget is exactly one body here, so a
# reservation counted twice shows as a 503.

STREAM_LIMIT = 16 * 1024


def callback_of_size(size: int) -> bytes:
    """The seed callback padded with an unknown member to exactly `size` bytes."""
    bare = json.dumps({**SEED_COMPLETED_VIDEO, "pad": ""}).encode()
    body = json.dumps({**SEED_COMPLETED_VIDEO, "pad": "x" * (size - len(bare))}).encode()
    assert len(body) == size
    return body


async def stream(port: int, body: bytes, *, pieces: int = 4) -> RawAnswer:
    """POST `body` chunked, in `pieces` chunks, each sent once the head is being handled."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = request_bytes(
            body=b"", headers={"Transfer-Encoding": "chunked"}, content_length=False
        )
        writer.write(head)
        await writer.drain()
        step = -(-len(body) // pieces)
        # An answer may come (and the connection close) before the last chunk is sent.
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(body), step):
                piece = body[start : start + step]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                # Give the handler a turn to read this chunk on its own (a later chunk
                # coalesced with it still has to give the same answer).
                await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return await read_answer(reader, timeout=10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_streamed_body_of_the_limit_is_taken_whole_and_one_byte_more_is_413() -> None:
    async with running_edge(
        max_body_bytes=STREAM_LIMIT, max_buffered_body_bytes=STREAM_LIMIT
    ) as listener:
        body = callback_of_size(STREAM_LIMIT)
        answer = await stream(listener.port, body)
        assert answer.status == 200, answer.body
        values = {record.topic: record.value for record in listener.publisher.records}
        assert json.loads(values["t.completed"]) == json.loads(body)
        # Each chunk is smaller than the limit; only their sum is over it.
        over = await stream(listener.port, callback_of_size(STREAM_LIMIT + 1))
        assert over.status == 413
        assert json.loads(over.body) == {
            "status": "rejected",
            "error": f"body larger than {STREAM_LIMIT} bytes",
        }
        assert listener.sample("luma_bridge_shed_total", reason="body_budget") == 0
        # The budget came back whole: the largest body is still taken.
        again = await stream(listener.port, callback_of_size(STREAM_LIMIT).replace(b"x", b"y"))
        assert again.status == 200


async def test_a_compressed_body_reserves_its_bytes_as_received_and_decoded_once() -> None:
    """The budget holds the body as received and decoded, each counted once: a gzip
    body whose two forms together fit the budget is taken, and gives all of it back."""
    async with running_edge(
        max_body_bytes=STREAM_LIMIT, max_buffered_body_bytes=STREAM_LIMIT
    ) as listener:
        noise = base64.b64encode(random.Random(7).randbytes(4 * 1024)).decode()
        body = json.dumps({**SEED_COMPLETED_VIDEO, "noise": noise}).encode()
        raw = gzip.compress(body)
        # Received and decoded fit; counting the received bytes twice more would not.
        assert len(raw) + len(body) <= STREAM_LIMIT < 3 * len(raw) + len(body)
        for _ in range(2):
            answer = await send_raw(
                listener.port, request_bytes(body=raw, headers={"Content-Encoding": "gzip"})
            )
            assert answer.status == 200, answer.body
        assert listener.sample("luma_bridge_shed_total", reason="body_budget") == 0


async def test_a_chunked_body_reserves_nothing_before_its_bytes_arrive() -> None:
    """With the whole budget held by a slow sender, an empty chunked body is still read
    (and refused as invalid JSON), not shed for a byte it never sent; a 2-byte body is shed."""
    async with running_edge(
        max_body_bytes=STREAM_LIMIT, max_buffered_body_bytes=STREAM_LIMIT
    ) as listener:
        holder = request_bytes(headers={"Content-Length": str(STREAM_LIMIT)}, body=b"{")
        _, slow = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            slow.write(holder)  # holds the whole budget while it trickles
            await slow.drain()
            await wait_until(
                lambda: listener.sample("luma_bridge_inflight_requests") == 1, timeout=10
            )
            empty = request_bytes(
                body=b"0\r\n\r\n", headers={"Transfer-Encoding": "chunked"}, content_length=False
            )
            answer = await send_raw(listener.port, empty)
            assert answer.status == 400
            assert json.loads(answer.body)["status"] == "invalid"
            assert listener.sample("luma_bridge_shed_total", reason="body_budget") == 0
            # Whereas any byte more than the budget is shed, the smallest body included.
            tiny = await send_raw(listener.port, request_bytes(body=b"{}"))
            assert tiny.status == 503
            assert listener.sample("luma_bridge_shed_total", reason="body_budget") == 1
        finally:
            slow.close()
            with contextlib.suppress(ConnectionError):
                await slow.wait_closed()


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(b"zz\r\n", id="chunk-size-not-hex"),
        pytest.param(b"3\r\nabcdef\r\n", id="chunk-longer-than-its-size"),
    ],
)
async def test_a_broken_chunked_encoding_is_400_malformed_with_the_pure_python_parser(
    monkeypatch: pytest.MonkeyPatch, broken: bytes
) -> None:
    """Where aiohttp runs without its C extensions (AIOHTTP_NO_EXTENSIONS=1, or no wheel
    for the platform) its parser fails the body itself: 400, nothing written. (With the C
    parser such a body is never finished and the body deadline answers 408.)"""
    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    async with running_edge() as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(
                request_bytes(
                    body=b"", headers={"Transfer-Encoding": "chunked"}, content_length=False
                )
            )
            await writer.drain()
            await wait_until(
                lambda: listener.sample("luma_bridge_inflight_requests") == 1, timeout=10
            )
            writer.write(broken)
            await writer.drain()
            answer = await read_answer(reader, timeout=5)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert answer.status == 400
        assert json.loads(answer.body) == {"status": "rejected", "error": "malformed request body"}
        assert listener.publisher.records == []


async def test_a_compressed_body_is_shed_when_its_decoded_bytes_do_not_fit_the_budget() -> None:
    """What a body decodes to counts against the budget too (a small gzip body can
    decode to the limit): with half the budget held, one that decodes to nearly the
    limit is shed, and one that decodes to less is taken."""
    async with running_edge(
        max_body_bytes=STREAM_LIMIT, max_buffered_body_bytes=2 * STREAM_LIMIT
    ) as listener:
        holder = request_bytes(headers={"Content-Length": str(STREAM_LIMIT)}, body=b"{")
        _, slow = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            slow.write(holder)  # holds half the budget while it trickles
            await slow.drain()
            await wait_until(
                lambda: listener.sample("luma_bridge_inflight_requests") == 1, timeout=10
            )
            large = gzip.compress(callback_of_size(STREAM_LIMIT - 16))
            assert len(large) > 16  # received and decoded together: over the half left
            shed = await send_raw(
                listener.port, request_bytes(body=large, headers={"Content-Encoding": "gzip"})
            )
            assert shed.status == 503
            assert listener.sample("luma_bridge_shed_total", reason="body_budget") == 1
            small = gzip.compress(callback_of_size(STREAM_LIMIT // 2))
            taken = await send_raw(
                listener.port, request_bytes(body=small, headers={"Content-Encoding": "gzip"})
            )
            assert taken.status == 200, taken.body
        finally:
            slow.close()
            with contextlib.suppress(ConnectionError):
                await slow.wait_closed()


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_trusted_peers_trace_context_is_carried_into_the_records() -> None:
    """The callback is handled in the context its (trusted) peer sent: its records carry
    that trace (export off: the incoming context is passed on as it came)."""
    settings = edge_settings()
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    tracing = Tracing(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    app = callback_app(settings, publisher=publisher, metrics=metrics, tracing=tracing)
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            PATH,
            data=json.dumps(SEED_COMPLETED_VIDEO).encode(),
            headers={"Content-Type": "application/json", "traceparent": TRACEPARENT},
        )
        assert response.status == 200
    assert len(publisher.records) == 2
    for record in publisher.records:
        assert dict(record.headers)["traceparent"] == TRACEPARENT.encode()
