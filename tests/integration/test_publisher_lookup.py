"""`KafkaPublisher.find` on the real broker: how the drainer learns that a send which
failed without an answer was written after all."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from bridge.delivery.publisher import KafkaPublisher, KafkaUnavailable, Record
from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError
from bridge.ops.metrics import Metrics
from bridge.settings import Settings
from tests.conftest import KafkaBroker, unavailable
from tests.faults.harness import frozen
from tests.helpers import bridge_settings


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


async def test_a_lookup_whose_consumer_cannot_start_in_time_still_closes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker stops answering (frozen) between a failed send and its lookup: the lookup
    gives up within its bound, and its consumer, stuck in start(), is closed all the same.
    Left open it held its connection and tasks, and asyncio logged "Unclosed
    AIOKafkaConsumer" at ERROR (seen in the bridge's log in outages)."""
    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        unavailable(f"no embedded broker: {exc}")
    try:
        settings = bridge_settings(broker.bootstrap, idempotence=False)
        record = _record(settings, "g1", "g1:queued")
        since = time.time_ns() // 1_000_000 - 1000
        async with KafkaPublisher(settings, metrics=Metrics(CollectorRegistry())) as publisher:
            await publisher.publish([record], ack_timeout=30)  # the topic's metadata is known
            with frozen(broker), caplog.at_level(logging.ERROR, logger="asyncio"):
                with pytest.raises(KafkaUnavailable):
                    await publisher.find([record], since, within=1.0)
                gc.collect()  # an unclosed client says so when it is collected
                await asyncio.sleep(0)
    finally:
        broker.stop()
    unclosed = [r.getMessage() for r in caplog.records if "Unclosed" in r.getMessage()]
    assert unclosed == []
