"""`KafkaPublisher.find` on stand-ins for aiokafka's producer and consumer: which of some
records are already in Kafka since a time, read from every partition of their topics,
bounded in time, and every failure one `KafkaUnavailable`. The real broker is in
tests/integration/test_publisher_lookup.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
from aiokafka import TopicPartition, errors
from aiokafka.structs import OffsetAndTimestamp
from prometheus_client import CollectorRegistry

from bridge.delivery import publisher as publisher_module
from bridge.delivery.publisher import KafkaPublisher, KafkaUnavailable, Record
from bridge.ops.metrics import Metrics
from tests.delivery.test_kafka_publisher import StandInProducer, settings


class Message(NamedTuple):
    timestamp: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def message(ts: int, record: Record) -> Message:
    return Message(ts, record.key, record.value, tuple(record.headers))


class StandInConsumer:
    """Reads `log` (topic → partition → messages, offset = index) two messages a call."""

    log: dict[str, dict[int, list[Message]]] = {}  # noqa: RUF012 - set by each test
    made: list[StandInConsumer] = []  # noqa: RUF012
    fail_start: Exception | None = None
    hang = False
    at_end = False  # offsets_for_times answers each partition's end offset

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.positions: dict[TopicPartition, int] = {}
        self.assigned: list[TopicPartition] = []
        self.reads = 0
        self.stopped = False
        StandInConsumer.made.append(self)

    async def start(self) -> None:
        if self.fail_start is not None:
            raise self.fail_start

    async def stop(self) -> None:
        self.stopped = True

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    async def offsets_for_times(
        self, times: dict[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        answer: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, since in times.items():
            messages = self.log[tp.topic][tp.partition]
            offset = next((n for n, m in enumerate(messages) if m.timestamp >= since), None)
            answer[tp] = (
                None if offset is None else OffsetAndTimestamp(offset, messages[offset].timestamp)
            )
            if self.at_end:
                answer[tp] = OffsetAndTimestamp(len(messages), since)
        return answer

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.log[tp.topic][tp.partition]) for tp in partitions}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int
    ) -> dict[TopicPartition, list[Message]]:
        assert timeout_ms == 200
        if self.hang:
            await asyncio.Event().wait()
        self.reads += 1
        batch: dict[TopicPartition, list[Message]] = {}
        for tp in partitions:
            start = self.positions[tp]
            taken = self.log[tp.topic][tp.partition][start : start + 2]
            self.positions[tp] = start + len(taken)
            if taken:
                batch[tp] = taken
        return batch

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


class Partitioned(StandInProducer):
    async def partitions_for(self, topic: str) -> set[int]:
        return set(StandInConsumer.log[topic])


@pytest.fixture
async def publisher(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KafkaPublisher]:
    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", Partitioned)
    monkeypatch.setattr(publisher_module, "AIOKafkaConsumer", StandInConsumer)
    monkeypatch.setattr(StandInProducer, "made", [])
    monkeypatch.setattr(StandInProducer, "mode", "ack")
    monkeypatch.setattr(StandInConsumer, "made", [])
    monkeypatch.setattr(StandInConsumer, "fail_start", None)
    monkeypatch.setattr(StandInConsumer, "hang", False)
    monkeypatch.setattr(StandInConsumer, "at_end", False)
    started = KafkaPublisher(
        settings(kafka_client_id="bridge-3", kafka_request_timeout_ms=4321),
        metrics=Metrics(CollectorRegistry()),
    )
    await started.start()
    try:
        yield started
    finally:
        await started.stop(timeout=1.0)


def record(n: int, topic: str = "t.queued") -> Record:
    return Record(topic, f"g{n}".encode(), f"v{n}".encode(), [("luma-state", b"queued")])


async def test_records_since_the_time_are_found_in_any_partition_of_their_topic(
    publisher: KafkaPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        StandInConsumer,
        "log",
        {
            "t.queued": {
                0: [message(100, record(0)), message(200, record(1))],
                1: [message(150, record(9)), message(300, record(2)), message(310, record(5))],
                2: [],
            },
            "t.lifecycle": {0: [message(250, record(3, "t.lifecycle"))]},
        },
    )
    wanted = [
        record(1),  # partition 0, after the time
        record(2),  # partition 1
        record(3, "t.lifecycle"),  # another topic
        record(0),  # in Kafka, but before the time
        record(4),  # nowhere
        Record("t.queued", b"g1", b"v1", []),  # same key and value, other headers
    ]
    assert await publisher.find(wanted, since_ms=180, within=5) == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    consumer = StandInConsumer.made[-1]
    assert consumer.stopped
    assert sorted(consumer.assigned) == sorted(
        [TopicPartition("t.queued", p) for p in (0, 1, 2)] + [TopicPartition("t.lifecycle", 0)]
    )
    assert consumer.options["client_id"] == "bridge-3-lookup"
    assert consumer.options["enable_auto_commit"] is False
    assert consumer.options["request_timeout_ms"] == 4321
    assert consumer.options["bootstrap_servers"] == "localhost:9092"
    assert consumer.options["security_protocol"] == "PLAINTEXT"


async def test_reading_stops_once_everything_is_found(
    publisher: KafkaPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = [message(100 + n, record(n)) for n in range(10)]
    monkeypatch.setattr(StandInConsumer, "log", {"t.queued": {0: log}})
    assert await publisher.find([record(1)], since_ms=0, within=5) == [True]
    assert StandInConsumer.made[-1].reads == 1
    assert await publisher.find([record(9)], since_ms=0, within=5) == [True]
    assert StandInConsumer.made[-1].reads == 5  # to the end, and no further
    assert await publisher.find([record(10)], since_ms=0, within=5) == [False]
    assert StandInConsumer.made[-1].reads == 5


async def test_nothing_to_find_asks_kafka_nothing(publisher: KafkaPublisher) -> None:
    assert await publisher.find([], since_ms=0, within=5) == []
    assert StandInConsumer.made == []


async def test_a_time_after_every_record_reads_nothing(
    publisher: KafkaPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StandInConsumer, "log", {"t.queued": {0: [message(100, record(1))]}})
    assert await publisher.find([record(1)], since_ms=101, within=5) == [False]
    assert StandInConsumer.made[-1].reads == 0
    assert StandInConsumer.made[-1].stopped


async def test_a_lookup_that_takes_too_long_is_unavailable_and_stops_its_consumer(
    publisher: KafkaPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StandInConsumer, "log", {"t.queued": {0: [message(100, record(1))]}})
    monkeypatch.setattr(StandInConsumer, "hang", True)
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.find([record(1)], since_ms=0, within=0.1)
    assert raised.value.reason == "timeout"
    assert isinstance(raised.value.__cause__, TimeoutError)
    assert StandInConsumer.made[-1].stopped


async def test_a_kafka_error_during_the_lookup_is_unavailable_by_its_class(
    publisher: KafkaPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StandInConsumer, "log", {"t.queued": {0: []}})
    monkeypatch.setattr(StandInConsumer, "fail_start", errors.KafkaConnectionError())
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.find([record(1)], since_ms=0, within=5)
    assert raised.value.reason == "KafkaConnectionError"


async def test_a_lookup_without_a_producer_is_not_connected(
    publisher: KafkaPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    await publisher.stop(timeout=1.0)
    with pytest.raises(KafkaUnavailable) as raised:
        await publisher.find([record(1)], since_ms=0, within=5)
    assert raised.value.reason == "not_connected"


async def test_a_partition_whose_start_is_its_end_is_not_read(
    publisher: KafkaPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StandInConsumer, "log", {"t.queued": {0: [message(100, record(1))]}})
    monkeypatch.setattr(StandInConsumer, "at_end", True)
    assert await publisher.find([record(1)], since_ms=0, within=5) == [False]
    assert StandInConsumer.made[-1].reads == 0
