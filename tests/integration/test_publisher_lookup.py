"""`KafkaPublisher.find` on the real broker: how the drainer learns that a send which
failed without an answer was written after all."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from bridge.delivery.publisher import KafkaPublisher, Record
from bridge.delivery.topics import create_topics
from bridge.ops.metrics import Metrics
from bridge.settings import Settings
from tests.conftest import KafkaBroker


def _record(settings: Settings, key: str, value: str) -> Record:
    return Record(f"{settings.topic_prefix}.lifecycle", key.encode(), value.encode(), [("h", b"1")])


async def test_find_sees_what_was_written_since_and_nothing_else(
    settings: Settings, kafka_broker: KafkaBroker
) -> None:
    await create_topics(settings)
    written = [_record(settings, f"g{n}", f"g{n}:queued") for n in range(5)]
    since = time.time_ns() // 1_000_000 - 1000
    async with KafkaPublisher(settings, metrics=Metrics(CollectorRegistry())) as publisher:
        await publisher.publish(written, ack_timeout=30)
        never = _record(settings, "g9", "g9:queued")
        other_value = _record(settings, "g1", "g1:dreaming")
        other_headers = Record(written[2].topic, written[2].key, written[2].value, [])
        assert await publisher.find(
            [written[3], never, other_value, written[0], other_headers], since, within=30
        ) == [True, False, False, True, False]
        # Written before `since` (and nothing after it): not looked at. The embedded
        # broker answers a time past its last record with that record's offset, so this
        # holds on Apache Kafka only; a copy found earlier would be the same record anyway.
        if kafka_broker.kind == "apache":
            later = time.time_ns() // 1_000_000 + 60_000
            assert await publisher.find([written[3]], later, within=30) == [False]
