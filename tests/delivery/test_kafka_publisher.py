"""`KafkaPublisher` on a stand-in for `AIOKafkaProducer` whose acknowledgements the test
controls: placements, the ack deadline, errors and their labels, start/stop/renew, the
futures a stopped producer still held. What a real broker does is in tests/integration and
tests/kafka; these are the fast tests that fail when the publisher's own logic is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import errors
from prometheus_client import CollectorRegistry

from bridge.delivery import publisher as publisher_module
from bridge.delivery.publisher import (
    KafkaPublisher,
    KafkaUnavailable,
    NotConnected,
    Placement,
    Record,
    RetryCounter,
    keyed_partitioner,
    wait_all,
)
from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import Settings, load_settings
from tests.edge.support import PATH, SEED_BODY
from tests.helpers import TOKEN

LUMA_TIMEOUT = 5.0

# Only the publisher's own lines: asyncio may log a future an earlier test left unread.
PUBLISHER_LOG = "bridge.delivery.publisher"


class Metadata(NamedTuple):
    partition: int
    offset: int


class StandInSender:
    def __init__(self) -> None:
        self.sender_task: asyncio.Task[Any] = asyncio.create_task(asyncio.Event().wait())


class StandInProducer:
    """Takes records like `AIOKafkaProducer.send`; acknowledges as `mode` says.

    ack: at once; never: the futures never complete (a broker that stopped answering);
    error: each future fails with `error`; refuse: send() itself raises (buffer full);
    stuck: send() itself never returns; waits: send() waits a loop turn, then ack;
    cancelled: the futures are cancelled;
    unreachable: start() fails; hang: stop() never returns (a flush that cannot finish);
    no_id: start() never returns (an idempotent producer that gets no producer id).
    """

    mode = "ack"
    error: Exception = errors.NotLeaderForPartitionError()
    made: list[StandInProducer] = []  # noqa: RUF012 - the instances the test created

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.sent: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = []
        self.pending: list[asyncio.Future[Metadata]] = []
        self.started = False
        self.stops = 0
        self.attempts = 0
        self.client_closed = False
        self.client = self  # fetch_all_metadata() and close() live on aiokafka's client
        self._sender = StandInSender()
        StandInProducer.made.append(self)

    async def start(self) -> None:
        if self.mode == "unreachable":
            raise errors.KafkaConnectionError()
        if self.mode == "no_id":  # aiokafka asks for one again and again, without a log line
            await asyncio.Event().wait()
        self.started = True

    async def stop(self) -> None:
        self.stops += 1
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "slow":  # a flush that takes a moment, within any sane timeout
            await asyncio.sleep(0.05)
        self.started = False
        self._sender.sender_task.cancel()

    async def close(self) -> None:
        self.client_closed = True

    async def _metadata_update(self, cluster_metadata: Any, topics: Any) -> bool:
        return True  # aiokafka's client's, which the publisher paces

    async def fetch_all_metadata(self) -> None:
        if self.mode == "never":
            await asyncio.Event().wait()
        if self.mode == "error":
            raise self.error

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Metadata]:
        future: asyncio.Future[Metadata] = asyncio.get_running_loop().create_future()
        self.attempts += 1
        if self.stops:
            raise errors.ProducerClosed()  # as aiokafka's send() on a stopped producer
        if self.mode == "refuse":
            raise errors.KafkaTimeoutError()
        if self.mode == "stuck":
            await asyncio.Event().wait()
        if self.mode == "waits":  # a moment's wait (metadata, buffer room), then acknowledged
            await asyncio.sleep(0)
        self.sent.append((topic, value, key, headers))
        if self.mode in ("ack", "waits"):
            future.set_result(Metadata(len(self.sent), 10 * len(self.sent)))
        elif self.mode == "error":
            future.set_exception(self.error)
        elif self.mode == "cancelled":
            future.cancel()
        else:
            self.pending.append(future)
        return future


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInProducer]:
    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", StandInProducer)
    monkeypatch.setattr(StandInProducer, "made", [])
    monkeypatch.setattr(StandInProducer, "mode", "ack")
    return StandInProducer


def settings(**overrides: Any) -> Settings:
    return load_settings(auth_tokens=TOKEN, topic_prefix="t", spool_enabled=False, **overrides)


@pytest.fixture
async def started(stand_in: type[StandInProducer]) -> AsyncIterator[tuple[KafkaPublisher, Metrics]]:
    metrics = Metrics(CollectorRegistry())
    publisher = KafkaPublisher(settings(), metrics=metrics)
    await publisher.start()
    try:
        yield publisher, metrics
    finally:
        await publisher.stop(timeout=1.0)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


RECORDS = [
    Record("t.completed", b"g", b"{}", [("luma-state", b"completed")]),
    Record("t.lifecycle", b"g", b"{}", []),
]


async def test_with_the_default_ack_timeout_a_silent_broker_is_answered_503_before_luma_gives_up(
    stand_in: type[StandInProducer],
) -> None:
    stand_in.mode = "never"
    configured = settings()
    assert configured.kafka_ack_timeout == 4.0  # the default this test is about
    metrics = Metrics(CollectorRegistry())
    async with KafkaPublisher(configured, metrics=metrics) as publisher:
        app = callback_app(configured, publisher=publisher, metrics=metrics)
        async with TestClient(TestServer(app)) as client:
            started = time.monotonic()
            response = await client.post(
                PATH, data=SEED_BODY, headers={"Content-Type": "application/json"}
            )
            elapsed = time.monotonic() - started
    assert response.status == 503
    assert configured.kafka_ack_timeout <= elapsed < LUMA_TIMEOUT, f"answered after {elapsed:.2f}s"


async def test_acknowledged_records_are_placed_and_timed_by_topic(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, metrics = started
    placements = await publisher.publish(RECORDS, ack_timeout=1.0)
    assert placements == [Placement("t.completed", 1, 10), Placement("t.lifecycle", 2, 20)]
    assert stand_in.made[-1].sent == [
        ("t.completed", b"{}", b"g", [("luma-state", b"completed")]),
        ("t.lifecycle", b"{}", b"g", []),
    ]
    for topic in ("t.completed", "t.lifecycle"):
        assert sample(metrics, "luma_bridge_kafka_produce_duration_seconds_count", topic=topic) == 1
        seconds = sample(metrics, "luma_bridge_kafka_produce_duration_seconds_sum", topic=topic)
        assert 0 <= seconds < 60
    await publisher.publish(RECORDS[:1], ack_timeout=1.0)
    count = "luma_bridge_kafka_produce_duration_seconds_count"
    assert sample(metrics, count, topic="t.completed") == 2


async def test_a_refused_record_fails_its_future_with_the_kafka_error(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, metrics = started
    stand_in.mode = "error"
    futures = publisher.send(RECORDS)
    await asyncio.wait(futures, timeout=5)
    assert all(isinstance(f.exception(), errors.NotLeaderForPartitionError) for f in futures)
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert raised.value.reason == "NotLeaderForPartitionError"
    reason = "NotLeaderForPartitionError"
    assert sample(metrics, "luma_bridge_kafka_produce_errors_total", reason=reason) == 4
    count = "luma_bridge_kafka_produce_duration_seconds_count"
    assert sample(metrics, count, topic="t.completed") == 0


async def test_a_send_that_cannot_even_be_buffered_fails_with_its_error(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, metrics = started
    stand_in.mode = "refuse"
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert raised.value.reason == "KafkaTimeoutError"
    assert isinstance(raised.value.__cause__, errors.KafkaTimeoutError)
    errors_total = "luma_bridge_kafka_produce_errors_total"
    assert sample(metrics, errors_total, reason="KafkaTimeoutError") == 2


async def test_a_cancelled_acknowledgement_fails_as_producer_closed(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, _ = started
    stand_in.mode = "cancelled"
    futures = publisher.send(RECORDS[:1])
    await asyncio.wait(futures, timeout=5)
    assert isinstance(futures[0].exception(), errors.ProducerClosed)


async def test_an_unacknowledged_record_times_out_at_the_ack_timeout_not_later(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, _ = started
    stand_in.mode = "never"
    began = time.monotonic()
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=0.2)
    assert 0.2 <= time.monotonic() - began < 0.9
    assert str(raised.value) == raised.value.reason == "timeout"


async def test_a_send_that_never_returns_times_out_and_a_stop_fails_what_it_held(
    stand_in: type[StandInProducer],
) -> None:
    stand_in.mode = "stuck"
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    await publisher.start()
    futures = publisher.send(RECORDS)
    with pytest.raises(KafkaUnavailable):
        await wait_all(futures, 0.1)
    await publisher.stop(timeout=1.0)
    assert all(f.done() for f in futures)
    assert all(isinstance(f.exception(), errors.ProducerClosed) for f in futures)


async def test_stopping_fails_the_futures_kafka_never_answered(
    stand_in: type[StandInProducer],
) -> None:
    stand_in.mode = "never"
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    await publisher.start()
    futures = publisher.send(RECORDS)
    await asyncio.sleep(0)  # let the hand-over run
    await publisher.stop(timeout=1.0)
    assert all(isinstance(f.exception(), errors.ProducerClosed) for f in futures)
    # aiokafka's own future resolving later changes nothing.
    stand_in.made[-1].pending[0].set_result(Metadata(0, 0))
    await asyncio.sleep(0)
    assert isinstance(futures[0].exception(), errors.ProducerClosed)


async def test_a_flush_that_hangs_is_abandoned_after_the_stop_timeout(
    stand_in: type[StandInProducer], caplog: pytest.LogCaptureFixture
) -> None:
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    await publisher.start()
    stand_in.mode = "never"
    futures = publisher.send(RECORDS[:1])
    await asyncio.sleep(0)
    stand_in.mode = "hang"
    producer = stand_in.made[-1]
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.publisher"):
        await publisher.stop(timeout=0.2)
    assert time.monotonic() - began < 2.0
    assert producer.client_closed
    assert producer._sender.sender_task.cancelled()
    assert isinstance(futures[0].exception(), errors.ProducerClosed)
    assert [r.getMessage() for r in caplog.records if r.name == PUBLISHER_LOG] == [
        "the Kafka producer did not flush in time; its records stay spooled"
    ]
    assert not publisher.connected


async def test_renew_closes_the_old_producer_at_once_and_starts_a_new_one(
    stand_in: type[StandInProducer], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(CollectorRegistry())
    publisher = KafkaPublisher(settings(), metrics=metrics)
    await publisher.start()
    stand_in.mode = "never"
    held = publisher.send(RECORDS[:1])
    await asyncio.sleep(0)
    stand_in.mode = "hang"
    old = stand_in.made[-1]
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.publisher"):
        stand_in.mode = "hang"
        renewing = asyncio.create_task(publisher.renew())
        await asyncio.sleep(0)
        stand_in.mode = "ack"  # the new producer works
        await asyncio.wait_for(renewing, 5)
    assert time.monotonic() - began < 1.0  # the old one is not given a flush
    assert "renewing the Kafka producer" in caplog.text
    assert len(stand_in.made) == 2
    assert old.stops == 1
    assert isinstance(held[0].exception(), errors.ProducerClosed)
    assert sample(metrics, "luma_bridge_kafka_producer_renewals_total") == 1
    assert publisher.connected
    placements = await publisher.publish(RECORDS[:1], ack_timeout=1.0)
    assert placements == [Placement("t.completed", 1, 10)]
    await publisher.stop(timeout=1.0)
    assert stand_in.made[-1].stops == 1


async def test_renew_without_a_producer_just_starts_one(stand_in: type[StandInProducer]) -> None:
    metrics = Metrics(CollectorRegistry())
    publisher = KafkaPublisher(settings(), metrics=metrics)
    await publisher.renew()
    assert publisher.connected
    assert len(stand_in.made) == 1
    assert sample(metrics, "luma_bridge_kafka_producer_renewals_total") == 1
    await publisher.stop(timeout=1.0)


async def test_publishing_before_start_or_after_stop_is_not_connected(
    stand_in: type[StandInProducer],
) -> None:
    metrics = Metrics(CollectorRegistry())
    publisher = KafkaPublisher(settings(), metrics=metrics)
    assert publisher.connected is False
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert raised.value.reason == "NotConnected"
    futures = publisher.send(RECORDS[:1])
    assert isinstance(futures[0].exception(), NotConnected)
    assert str(futures[0].exception()) == "NotConnected: not_connected"
    await publisher.start()
    assert publisher.connected
    await publisher.stop()
    await publisher.stop()  # safe twice
    assert stand_in.made[-1].stops == 1
    assert publisher.connected is False
    with pytest.raises(KafkaUnavailable):
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert sample(metrics, "luma_bridge_kafka_produce_errors_total", reason="not_connected") == 5


async def test_a_cluster_that_cannot_be_reached_at_start_is_unavailable_and_stopped_once(
    stand_in: type[StandInProducer],
) -> None:
    stand_in.mode = "unreachable"
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.start()
    assert raised.value.reason == "KafkaConnectionError"
    assert not publisher.connected
    await publisher.stop()
    assert stand_in.made[-1].stops == 1  # by start(), which cleans up its half-open connections


async def test_a_start_that_never_finishes_gives_up_after_the_request_timeout(
    stand_in: type[StandInProducer], caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal after a whole-cluster restart once waited for ever for a producer id:
    the drainer stood still and the spool never drained (fault scenario, CI)."""
    stand_in.mode = "no_id"
    publisher = KafkaPublisher(
        settings(kafka_request_timeout_ms=1000), metrics=Metrics(CollectorRegistry())
    )
    began = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="bridge.delivery.publisher"),
        pytest.raises(KafkaUnavailable) as raised,
    ):
        await asyncio.wait_for(publisher.start(), 5)
    assert 1.0 <= time.monotonic() - began < 3.0
    assert raised.value.reason == "start_timeout"
    assert stand_in.made[-1].stops == 1  # its connections are not left open
    assert not publisher.connected
    assert [r.getMessage() for r in caplog.records if r.name == PUBLISHER_LOG] == [
        "the Kafka producer did not start within the request timeout (no metadata, or no "
        "producer id for idempotence); retrying with a new one"
    ]
    stand_in.mode = "ack"
    await publisher.renew()  # the next one is a new producer, which starts
    assert await publisher.check_connection(0.1)
    await publisher.stop(timeout=1.0)


@pytest.mark.parametrize(("mode", "answers"), [("ack", True), ("never", False), ("error", False)])
async def test_the_connection_check_is_true_only_when_metadata_comes_in_time(
    stand_in: type[StandInProducer], mode: str, answers: bool
) -> None:
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    assert not await publisher.check_connection(0.1)  # not started
    async with publisher:
        stand_in.mode = mode
        assert await publisher.check_connection(0.2) is answers
    assert not await publisher.check_connection(0.1)  # stopped


async def test_retries_are_counted_only_while_the_publisher_runs(
    stand_in: type[StandInProducer],
) -> None:
    metrics = Metrics(CollectorRegistry())
    sender_log = logging.getLogger(RetryCounter.LOGGER)
    async with KafkaPublisher(settings(), metrics=metrics) as publisher:
        sender_log.warning("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
        assert sample(metrics, "luma_bridge_kafka_produce_retries_total") == 1
        await publisher.renew()  # a second start() must not add the counter twice
        sender_log.warning("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
    sender_log.warning("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
    assert sample(metrics, "luma_bridge_kafka_produce_retries_total") == 2


def test_the_retry_counter_counts_only_warnings_and_lets_each_kind_of_line_through() -> None:
    metrics = Metrics(CollectorRegistry())
    counter = RetryCounter(metrics)
    for level, message in (
        (logging.WARNING, "Cannot send %r"),
        (logging.WARNING, "Could not send %r"),
        (logging.INFO, "Cannot send %r"),
        (logging.ERROR, "Cannot send %r"),
        (logging.WARNING, "unrelated"),
    ):
        record = logging.LogRecord(RetryCounter.LOGGER, level, "", 0, message, (), None)
        assert counter.filter(record) is True
    assert sample(metrics, "luma_bridge_kafka_produce_retries_total") == 2


def test_retries_whose_lines_are_held_back_as_repeats_are_counted_all_the_same() -> None:
    metrics = Metrics(CollectorRegistry())
    counter = RetryCounter(metrics)
    passed = [
        counter.filter(
            logging.LogRecord(
                RetryCounter.LOGGER, logging.WARNING, "", 0, "Cannot send %r", ("x",), None
            )
        )
        for _ in range(50)
    ]
    assert passed == [True] + [False] * 49  # the sender's retry loop: one line per window
    assert sample(metrics, "luma_bridge_kafka_produce_retries_total") == 50


def test_records_without_a_key_go_to_any_partition_even_when_none_is_known_available() -> None:
    for _ in range(20):
        assert keyed_partitioner(None, [0, 1, 2], []) in {0, 1, 2}


def test_the_producer_options_come_from_the_settings() -> None:
    options = publisher_module.producer_options(
        settings(
            kafka_bootstrap_servers="k1:9092,k2:9092",
            kafka_client_id="bridge-7",
            kafka_enable_idempotence=False,
            kafka_linger_ms=7,
            kafka_max_batch_size=65536,
            kafka_request_timeout_ms=12345,
            kafka_compression_type="none",
            max_body_bytes=2048,
        )
    )
    expected = {
        "bootstrap_servers": "k1:9092,k2:9092",
        "client_id": "bridge-7",
        "acks": "all",
        "enable_idempotence": False,
        "compression_type": None,
        "linger_ms": 7,
        "max_batch_size": 65536,
        "max_request_size": 2048 + 64 * 1024,
        "request_timeout_ms": 12345,
        "partitioner": keyed_partitioner,
    }
    assert {name: options[name] for name in expected} == expected
    assert options["security_protocol"] == "PLAINTEXT"
    lz4 = publisher_module.producer_options(settings(kafka_compression_type="lz4"))
    assert lz4["compression_type"] == "lz4"


async def test_a_renewal_that_cannot_reach_the_cluster_leaves_the_publisher_not_connected(
    stand_in: type[StandInProducer], caplog: pytest.LogCaptureFixture
) -> None:
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    await publisher.start()
    stand_in.mode = "unreachable"
    with (
        caplog.at_level(logging.WARNING, logger="bridge.delivery.publisher"),
        pytest.raises(KafkaUnavailable),
    ):
        await publisher.renew()
    assert [r.getMessage() for r in caplog.records if r.name == PUBLISHER_LOG] == [
        "renewing the Kafka producer after an error that left it unusable"
    ]
    assert not await publisher.check_connection(0.1)
    futures = publisher.send(RECORDS[:1])
    assert isinstance(futures[0].exception(), NotConnected)
    await publisher.stop()  # nothing left to stop
    assert publisher.connected is False
    stand_in.mode = "ack"
    await publisher.renew()  # the next renewal works
    assert await publisher.check_connection(0.1)
    await publisher.stop(timeout=1.0)


class Unclosable:
    """A producer whose flush and client close hang, and whose client close then fails."""

    def __init__(self, *, closes: str) -> None:
        self.closes = closes
        self.client = self

    async def stop(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        if self.closes == "raises":
            raise errors.KafkaConnectionError()
        await asyncio.Event().wait()


@pytest.mark.parametrize("closes", ["raises", "hangs"])
async def test_abandoning_a_producer_is_bounded_whatever_its_internals(closes: str) -> None:
    """No `_sender` (a different aiokafka): the client is closed and nothing else is tried."""
    began = time.monotonic()
    await publisher_module._abandon(Unclosable(closes=closes))
    assert time.monotonic() - began < 1.0  # each step waits at most 0.25 s


async def test_abandoning_waits_briefly_for_a_sender_task_slow_to_stop() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(2)  # a slow clean-up; a second cancellation cuts it short
            raise

    producer = Unclosable(closes="raises")
    sender = StandInSender.__new__(StandInSender)
    sender.sender_task = asyncio.create_task(slow_to_stop())
    producer._sender = sender  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    began = time.monotonic()
    await publisher_module._abandon(producer)
    assert time.monotonic() - began < 1.0
    assert sender.sender_task.cancelled()


async def test_a_flush_that_finishes_within_the_timeout_is_not_abandoned(
    stand_in: type[StandInProducer], caplog: pytest.LogCaptureFixture
) -> None:
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    await publisher.start()
    stand_in.mode = "slow"
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.publisher"):
        await publisher.stop(timeout=0.9)
    assert caplog.records == []
    assert not stand_in.made[-1].client_closed


async def test_nothing_is_kept_for_records_that_ended(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, _ = started
    await publisher.publish(RECORDS, ack_timeout=1.0)
    stand_in.mode = "error"
    futures = publisher.send(RECORDS)
    await asyncio.wait(futures, timeout=5)
    for _ in range(3):  # the hand-over task's own done callback runs after it
        await asyncio.sleep(0)
    assert publisher._outstanding == set()
    assert publisher._handing == set()


async def test_a_hand_over_cut_short_by_stop_still_hands_over_the_rest(
    stand_in: type[StandInProducer],
) -> None:
    """The first send waits (metadata) when the producer is stopped: that record fails as
    closed, and each following one gets the producer's own answer (closed, counted)."""
    metrics = Metrics(CollectorRegistry())
    publisher = KafkaPublisher(settings(), metrics=metrics)
    await publisher.start()
    stand_in.mode = "stuck"
    futures = publisher.send(RECORDS)
    await asyncio.sleep(0)
    stand_in.mode = "slow"
    await publisher.stop(timeout=1.0)
    for _ in range(3):
        await asyncio.sleep(0)
    assert all(isinstance(f.exception(), errors.ProducerClosed) for f in futures)
    assert stand_in.made[-1].attempts == 2
    assert sample(metrics, "luma_bridge_kafka_produce_errors_total", reason="ProducerClosed") == 1


async def test_a_hand_over_that_never_waits_is_done_before_send_returns(
    stand_in: type[StandInProducer],
) -> None:
    """No task per callback: the records are with the producer when `send` returns."""
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    await publisher.start()
    futures = publisher.send(RECORDS)
    assert stand_in.made[-1].attempts == len(RECORDS)
    assert publisher._handing == set()
    await wait_all(futures, 1.0)
    await publisher.stop()


async def test_run_eagerly_finishes_in_a_task_what_waits_and_passes_answers_on() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[str] = loop.create_future()
    seen: list[str] = []

    async def steps() -> None:
        seen.append("before")
        seen.append(await gate)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")

    task = publisher_module.run_eagerly(steps())
    assert seen == ["before"]
    assert task is not None
    gate.set_result("answer")
    await wait_until_seen(seen, 2)
    assert seen == ["before", "answer"]
    task.cancel()
    await task
    assert seen == ["before", "answer", "cancelled"]


async def test_run_eagerly_runs_a_coroutine_that_never_waits_to_its_end() -> None:
    seen: list[str] = []

    async def at_once() -> None:
        seen.append("done")

    assert publisher_module.run_eagerly(at_once()) is None
    assert seen == ["done"]


async def wait_until_seen(seen: list[str], count: int) -> None:
    for _ in range(100):
        if len(seen) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {seen} after 100 loop turns")


async def test_a_hand_over_that_waits_finishes_in_a_task_that_is_then_forgotten(
    stand_in: type[StandInProducer],
) -> None:
    publisher = KafkaPublisher(settings(), metrics=Metrics(CollectorRegistry()))
    await publisher.start()
    stand_in.mode = "waits"
    futures = publisher.send(RECORDS)
    assert len(publisher._handing) == 1
    placements = await wait_all(futures, 1.0)
    assert [placement.topic for placement in placements] == [r.topic for r in RECORDS]
    for _ in range(100):
        if not publisher._handing:
            break
        await asyncio.sleep(0)
    assert publisher._handing == set()
    await publisher.stop()
