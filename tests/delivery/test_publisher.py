"""The producer: partitioning like every other Kafka client, the ack deadline, its metrics.

The deadline and label tests put a stand-in for `AIOKafkaProducer` under the publisher
(one whose acknowledgements the test controls); what a real broker does is in
tests/integration. The retry counter is checked against a real broker that stops
answering, so an aiokafka upgrade that rewords its warnings fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NotLeaderForPartitionError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry

from bridge.delivery import publisher as publisher_module
from bridge.delivery.publisher import (
    KafkaPublisher,
    KafkaUnavailable,
    Record,
    RetryCounter,
    keyed_partitioner,
)
from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker
from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import Settings, load_settings
from tests.edge.support import PATH, SEED_BODY
from tests.helpers import TOKEN, bridge_settings, wait_until

LUMA_TIMEOUT = 5.0


class Metadata(NamedTuple):
    partition: int
    offset: int


class StandInProducer:
    """Takes records like `AIOKafkaProducer.send`; acknowledges as `mode` says.

    ack: at once; never: the futures never complete (a broker that stopped answering);
    error: each future fails with `error`; refuse: send() itself raises (buffer full).
    """

    mode = "ack"
    error: Exception = NotLeaderForPartitionError()
    made: list[StandInProducer] = []  # noqa: RUF012 - the instances the test created

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.sent: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = []
        self.started = False
        StandInProducer.made.append(self)

        self.stops = 0
        self.client = self  # fetch_all_metadata() lives on aiokafka's client

    async def start(self) -> None:
        if self.mode == "unreachable":
            raise KafkaConnectionError()
        self.started = True

    async def stop(self) -> None:
        self.stops += 1
        self.started = False

    async def fetch_all_metadata(self) -> None:
        if self.mode == "never":
            await asyncio.Event().wait()
        if self.mode == "error":
            raise self.error

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Metadata]:
        future: asyncio.Future[Metadata] = asyncio.get_running_loop().create_future()
        if self.mode == "refuse":
            raise KafkaTimeoutError()
        if self.mode == "stuck":  # send() itself never returns (no metadata, buffer full)
            await asyncio.Event().wait()
        self.sent.append((topic, value, key, headers))
        if self.mode == "ack":
            future.set_result(Metadata(0, len(self.sent) - 1))
        elif self.mode == "error":
            future.set_exception(self.error)
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
        await publisher.stop()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


RECORDS = [
    Record("t.completed", b"g", b"{}", []),
    Record("t.lifecycle", b"g", b"{}", []),
]


def test_the_cached_partitioner_places_keys_as_the_java_client_does() -> None:
    partitions = list(range(6))
    for n in range(200):
        key = f"generation-{n}".encode()
        expected = DefaultPartitioner()(key, partitions, partitions)
        assert keyed_partitioner(key, partitions, partitions) == expected
    assert keyed_partitioner(None, partitions, [4]) == 4


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
    assert sample(metrics, "luma_bridge_kafka_produce_errors_total", reason="timeout") == 1


async def test_acknowledged_records_are_placed_and_timed_by_topic(
    started: tuple[KafkaPublisher, Metrics],
) -> None:
    publisher, metrics = started
    placements = await publisher.publish(RECORDS, ack_timeout=1.0)
    assert [(p.topic, p.partition, p.offset) for p in placements] == [
        ("t.completed", 0, 0),
        ("t.lifecycle", 0, 1),
    ]
    for topic in ("t.completed", "t.lifecycle"):
        assert sample(metrics, "luma_bridge_kafka_produce_duration_seconds_count", topic=topic) == 1


async def test_a_refused_record_is_unavailable_with_the_kafka_error_as_reason(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, metrics = started
    stand_in.mode = "error"
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert raised.value.reason == "NotLeaderForPartitionError"
    assert (
        sample(
            metrics, "luma_bridge_kafka_produce_errors_total", reason="NotLeaderForPartitionError"
        )
        == 1
    )
    assert (
        sample(metrics, "luma_bridge_kafka_produce_duration_seconds_count", topic="t.completed")
        == 0
    )


async def test_a_send_that_cannot_even_be_buffered_is_unavailable(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, metrics = started

    stand_in.mode = "refuse"
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert raised.value.reason == "KafkaTimeoutError"
    assert (
        sample(metrics, "luma_bridge_kafka_produce_errors_total", reason="KafkaTimeoutError") == 1
    )


async def test_publishing_before_start_or_after_stop_is_not_connected(
    stand_in: type[StandInProducer],
) -> None:
    metrics = Metrics(CollectorRegistry())
    publisher = KafkaPublisher(settings(), metrics=metrics)
    assert not publisher.connected
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert raised.value.reason == "not_connected"
    await publisher.start()
    assert publisher.connected
    await publisher.stop()
    await publisher.stop()  # safe twice
    assert not publisher.connected
    with pytest.raises(KafkaUnavailable):
        await publisher.publish(RECORDS, ack_timeout=1.0)
    assert sample(metrics, "luma_bridge_kafka_produce_errors_total", reason="not_connected") == 2


def test_the_producer_writes_with_acks_all_and_the_configured_options() -> None:
    options = publisher_module.producer_options(
        settings(kafka_compression_type="none", max_body_bytes=2048)
    )
    assert options["acks"] == "all"
    assert options["compression_type"] is None
    assert options["max_request_size"] == 2048 + 64 * 1024
    assert options["partitioner"] is keyed_partitioner
    assert (
        publisher_module.producer_options(settings(kafka_compression_type="lz4"))[
            "compression_type"
        ]
        == "lz4"
    )


def test_the_producers_retry_warnings_are_counted() -> None:
    metrics = Metrics(CollectorRegistry())
    counter = RetryCounter(metrics)
    sender_log = logging.getLogger(RetryCounter.LOGGER)
    sender_log.addFilter(counter)
    try:
        sender_log.warning(
            "Got error produce response on topic-partition %s, retrying. Error: %s", "t-0", "x"
        )
        sender_log.warning("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
        sender_log.info("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
        sender_log.warning("something else")
    finally:
        sender_log.removeFilter(counter)
    assert metrics.registry.get_sample_value("luma_bridge_kafka_produce_retries_total") == 2


@pytest.mark.integration
async def test_a_real_producer_retry_is_counted(own_broker: EmbeddedBroker) -> None:
    """aiokafka's own warning, from a broker that stops answering for a while."""
    config = bridge_settings(own_broker.bootstrap, False, kafka_request_timeout_ms=1000)
    await create_topics(config)
    metrics = Metrics(CollectorRegistry())
    async with KafkaPublisher(config, metrics=metrics) as publisher:
        await publisher.publish([Record(f"{config.topic_prefix}.queued", b"g", b"{}", [])], 10.0)
        os.kill(own_broker.pid, signal.SIGSTOP)
        try:
            sending = asyncio.create_task(
                publisher.publish([Record(f"{config.topic_prefix}.queued", b"g", b"{}", [])], 30.0)
            )
            await wait_until(
                lambda: sample(metrics, "luma_bridge_kafka_produce_retries_total") >= 1,
                timeout=20,
                what="aiokafka to log a retry",
            )
        finally:
            os.kill(own_broker.pid, signal.SIGCONT)
        # Whether this one record then landed is not the point (aiokafka may give up on it).
        with contextlib.suppress(KafkaUnavailable):
            await asyncio.wait_for(sending, 30)


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
    async with KafkaPublisher(settings(), metrics=metrics):
        sender_log.warning("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
    sender_log.warning("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
    assert sample(metrics, "luma_bridge_kafka_produce_retries_total") == 1


def test_the_retry_counter_never_swallows_a_log_record() -> None:
    counter = RetryCounter(Metrics(CollectorRegistry()))
    for message in ("Cannot send %r", "unrelated"):
        record = logging.LogRecord(RetryCounter.LOGGER, logging.WARNING, "", 0, message, (), None)
        assert counter.filter(record) is True


def test_records_without_a_key_go_to_any_partition_even_when_none_is_known_available() -> None:
    for _ in range(20):
        assert keyed_partitioner(None, [0, 1, 2], []) in {0, 1, 2}


async def test_each_record_is_sent_whole_and_timed_once(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, metrics = started
    records = [Record("t.completed", b"g", b"{}", [("luma-state", b"completed")])]
    await publisher.publish(records, ack_timeout=1.0)
    assert stand_in.made[-1].sent == [("t.completed", b"{}", b"g", [("luma-state", b"completed")])]
    seconds = sample(metrics, "luma_bridge_kafka_produce_duration_seconds_sum", topic="t.completed")
    assert 0 <= seconds < 60


async def test_a_send_that_never_returns_times_out_at_the_ack_timeout(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, metrics = started
    stand_in.mode = "stuck"
    began = time.monotonic()
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.publish(RECORDS, ack_timeout=0.2)
    assert time.monotonic() - began < 0.8
    assert str(raised.value) == raised.value.reason == "timeout"
    assert sample(metrics, "luma_bridge_kafka_produce_errors_total", reason="timeout") == 1


async def test_an_unacknowledged_record_times_out_at_the_ack_timeout_not_later(
    stand_in: type[StandInProducer], started: tuple[KafkaPublisher, Metrics]
) -> None:
    publisher, _ = started
    stand_in.mode = "never"
    began = time.monotonic()
    with pytest.raises(KafkaUnavailable):
        await publisher.publish(RECORDS, ack_timeout=0.2)
    assert time.monotonic() - began < 0.8


def test_the_producer_options_come_from_the_settings() -> None:
    options = publisher_module.producer_options(
        settings(
            kafka_bootstrap_servers="k1:9092,k2:9092",
            kafka_client_id="bridge-7",
            kafka_enable_idempotence=False,
            kafka_linger_ms=7,
            kafka_max_batch_size=65536,
            kafka_request_timeout_ms=12345,
        )
    )
    assert {
        name: options[name]
        for name in (
            "bootstrap_servers",
            "client_id",
            "enable_idempotence",
            "linger_ms",
            "max_batch_size",
            "request_timeout_ms",
        )
    } == {
        "bootstrap_servers": "k1:9092,k2:9092",
        "client_id": "bridge-7",
        "enable_idempotence": False,
        "linger_ms": 7,
        "max_batch_size": 65536,
        "request_timeout_ms": 12345,
    }
