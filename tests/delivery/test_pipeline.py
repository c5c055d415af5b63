"""`Pipeline` on its own, on an in-memory publisher: what each outcome carries (reason,
callback, placements, spooled), the records it makes, the dead-letter path the edge calls,
and its spans when tracing exports."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from bridge.contract.callback import Callback, CloudEvents, InvalidCallback, Topics
from bridge.delivery.dedupe import DedupeWindow
from bridge.delivery.lanes import Lanes
from bridge.delivery.pipeline import Outcome, Pipeline
from bridge.delivery.publisher import Placement
from bridge.delivery.verification import VERIFIED_HEADER, Action, Verdict, Verified
from bridge.ops.metrics import Metrics
from bridge.ops.tracing import Tracing
from tests.helpers import SEED_COMPLETED_VIDEO, MemoryPublisher

GENERATION = "0b8e4c5e-2f7a-4d6b-9a53-6a1d3c2b1f00"


def state(name: str) -> bytes:
    return json.dumps({**SEED_COMPLETED_VIDEO, "id": GENERATION, "state": name}).encode()


def pipeline(
    publisher: MemoryPublisher, metrics: Metrics, *, lifecycle: bool = True, **options: object
) -> Pipeline:
    return Pipeline(
        publisher=publisher,
        topics=Topics("t"),
        metrics=metrics,
        ack_timeout=1.0,
        lifecycle=lifecycle,
        dedupe=DedupeWindow(size=100, ttl=60),
        **options,  # type: ignore[arg-type]
    )


async def test_an_accepted_callback_carries_its_placements() -> None:
    publisher = MemoryPublisher()
    result = await pipeline(publisher, Metrics(CollectorRegistry())).handle(
        state("queued"), datetime.now(UTC)
    )
    assert result.outcome is Outcome.ACCEPTED
    assert result.reason == ""
    assert result.callback is not None
    assert result.callback.generation_id == GENERATION
    assert result.placements == (Placement("t.queued", 0, 0), Placement("t.lifecycle", 0, 1))
    assert result.spooled is False


async def test_without_the_lifecycle_topic_one_record_per_callback() -> None:
    publisher = MemoryPublisher()
    result = await pipeline(publisher, Metrics(CollectorRegistry()), lifecycle=False).handle(
        state("dreaming"), datetime.now(UTC)
    )
    assert result.outcome is Outcome.ACCEPTED
    assert [r.topic for r in publisher.records] == ["t.dreaming"]


async def test_a_record_kafka_refuses_for_good_is_rejected_with_its_reason() -> None:
    publisher = MemoryPublisher()
    publisher.failing = "RecordTooLargeError"
    result = await pipeline(publisher, Metrics(CollectorRegistry())).handle(
        state("queued"), datetime.now(UTC)
    )
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "Kafka refuses this callback for good: RecordTooLargeError"
    assert result.callback is not None
    # Not remembered as written: a retry is tried again.
    publisher.failing = None
    again = await pipeline(publisher, Metrics(CollectorRegistry())).handle(
        state("queued"), datetime.now(UTC)
    )
    assert again.outcome is Outcome.ACCEPTED


async def test_kafka_unavailable_without_a_spool_answers_unavailable_with_the_reason() -> None:
    publisher = MemoryPublisher()
    publisher.failing = "KafkaTimeoutError"
    metrics = Metrics(CollectorRegistry())
    result = await pipeline(publisher, metrics).handle(state("queued"), datetime.now(UTC))
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.reason == "Kafka unavailable: KafkaTimeoutError"
    assert result.callback is not None
    assert not metrics.registry.get_sample_value("luma_bridge_shed_total", {"reason": "spool_full"})


async def test_the_edge_dead_letters_a_body_it_could_not_decode() -> None:
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    line = pipeline(publisher, metrics)
    error = InvalidCallback("body does not decode as gzip", "encoding")
    result = await line.dead_letter(b"\x1f\x8bnot gzip", error, datetime.now(UTC))
    assert result.outcome is Outcome.INVALID
    assert result.reason == "body does not decode as gzip"
    assert result.callback is None
    assert result.placements == (Placement("t.deadletter", 0, 0),)
    assert [(r.topic, r.key, r.value) for r in publisher.records] == [
        ("t.deadletter", None, b"\x1f\x8bnot gzip")
    ]
    assert (
        metrics.registry.get_sample_value("luma_bridge_deadletters_total", {"reason": "encoding"})
        == 1
    )
    # Luma's retries of the same body: answered 400 again, dead-lettered once.
    again = await line.dead_letter(b"\x1f\x8bnot gzip", error, datetime.now(UTC))
    assert (again.outcome, again.reason, again.placements) == (
        Outcome.INVALID,
        "body does not decode as gzip",
        (),
    )
    assert len(publisher.records) == 1


async def test_the_pipeline_uses_the_lanes_it_is_given() -> None:
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    lanes = Lanes(publisher=publisher, spool=None, metrics=metrics)
    other = MemoryPublisher()
    line = pipeline(other, metrics, lanes=lanes)
    assert (await line.handle(state("queued"), datetime.now(UTC))).outcome is Outcome.ACCEPTED
    assert len(publisher.records) == 2
    assert other.records == []


async def test_spans_are_exported_for_validation_and_the_kafka_write() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(tracer_provider=provider)
    publisher = MemoryPublisher()
    line = pipeline(publisher, Metrics(CollectorRegistry()), tracing=tracing)
    with tracing.request({}, None):
        result = await line.handle(state("queued"), datetime.now(UTC))
    assert result.outcome is Outcome.ACCEPTED
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"validate", "kafka produce"} <= spans.keys()
    assert spans["kafka produce"].attributes == {"records": 2}
    # Each record carries the trace it was written in, besides its own headers.
    for record in publisher.records:
        names = [name for name, _ in record.headers]
        assert "traceparent" in names
        assert {"luma-event-id", "luma-state", "ce_id"} <= set(names)
    provider.shutdown()


async def test_the_write_token_under_a_configured_callback_path_never_reaches_kafka() -> None:
    publisher = MemoryPublisher()
    line = pipeline(publisher, Metrics(CollectorRegistry()), callback_path="/hooks/luma")
    callback = {**SEED_COMPLETED_VIDEO, "id": GENERATION, "state": "queued"}
    callback["request"] = {
        **SEED_COMPLETED_VIDEO["request"],
        "callback_url": "https://bridge.example/hooks/luma/s3cret-token",
    }
    result = await line.handle(json.dumps(callback).encode(), datetime.now(UTC))
    assert result.outcome is Outcome.ACCEPTED
    for record in publisher.records:
        assert b"s3cret-token" not in record.value
        assert json.loads(record.value)["request"]["callback_url"] == (
            "https://bridge.example/hooks/luma/REDACTED"
        )


async def test_cloudevents_attributes_only_when_enabled() -> None:
    on, off = MemoryPublisher(), MemoryPublisher()
    await pipeline(on, Metrics(CollectorRegistry())).handle(state("queued"), datetime.now(UTC))
    await pipeline(
        off, Metrics(CollectorRegistry()), cloudevents=CloudEvents(enabled=False)
    ).handle(state("queued"), datetime.now(UTC))
    assert any(name.startswith("ce_") for name, _ in on.records[0].headers)
    assert not any(name.startswith("ce_") for name, _ in off.records[0].headers)
    assert ("luma-state", b"queued") in off.records[0].headers


class Verifier:
    """Answers every callback with `verdict`, and remembers what it was asked."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.asked: list[str] = []

    async def verify(self, callback: Callback) -> Verdict:
        self.asked.append(callback.event_id)
        return self.verdict


async def test_a_verified_callback_is_written_with_the_verdict_in_a_header() -> None:
    for verified in (Verified.TRUE, Verified.UNKNOWN):
        publisher = MemoryPublisher()
        verifier = Verifier(Verdict(verified, Action.WRITE))
        line = pipeline(publisher, Metrics(CollectorRegistry()), verifier=verifier)
        result = await line.handle(state("queued"), datetime.now(UTC))
        assert result.outcome is Outcome.ACCEPTED
        assert result.callback is not None
        assert verifier.asked == [result.callback.event_id]
        assert len(publisher.records) == 2
        for record in publisher.records:
            assert (VERIFIED_HEADER, verified.value.encode()) in record.headers
            assert ("luma-state", b"queued") in record.headers


async def test_a_callback_the_verifier_refuses_is_unauthorized_and_written_nowhere() -> None:
    publisher = MemoryPublisher()
    verdict = Verdict(Verified.FALSE, Action.REFUSE, "Luma does not know this generation")
    line = pipeline(publisher, Metrics(CollectorRegistry()), verifier=Verifier(verdict))
    result = await line.handle(state("queued"), datetime.now(UTC))
    assert (result.outcome, result.reason) == (
        Outcome.UNAUTHORIZED,
        "Luma does not know this generation",
    )
    assert result.callback is not None
    assert publisher.records == []
    assert publisher.calls == 0


async def test_a_callback_the_verifier_cannot_check_yet_is_answered_unavailable() -> None:
    publisher = MemoryPublisher()
    verdict = Verdict(Verified.UNKNOWN, Action.RETRY_LATER, "Luma's API did not answer")
    verifier = Verifier(verdict)
    line = pipeline(publisher, Metrics(CollectorRegistry()), verifier=verifier)
    result = await line.handle(state("queued"), datetime.now(UTC))
    assert (result.outcome, result.reason) == (Outcome.UNAVAILABLE, "Luma's API did not answer")
    assert result.callback is not None
    assert publisher.records == []
    # Not remembered: Luma's retry is checked again.
    await line.handle(state("queued"), datetime.now(UTC))
    assert len(verifier.asked) == 2


async def test_without_a_verifier_records_carry_no_verdict() -> None:
    publisher = MemoryPublisher()
    await pipeline(publisher, Metrics(CollectorRegistry())).handle(
        state("queued"), datetime.now(UTC)
    )
    assert all(VERIFIED_HEADER not in dict(r.headers) for r in publisher.records)


async def test_the_verification_is_a_span_of_its_own() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(tracer_provider=provider)
    line = pipeline(
        MemoryPublisher(),
        Metrics(CollectorRegistry()),
        tracing=tracing,
        verifier=Verifier(Verdict(Verified.TRUE, Action.WRITE)),
    )
    with tracing.request({}, None):
        await line.handle(state("queued"), datetime.now(UTC))
    assert "verify" in {span.name for span in exporter.get_finished_spans()}
    provider.shutdown()
