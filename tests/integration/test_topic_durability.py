"""Kafka's side of durability (issue 11, finding 7), against the real broker.

`topics create` sets min.insync.replicas and a max.message.bytes that fits the body
limit; existing topics are read, never altered: a single-replica acks=all is warned
about, and a body a topic cannot take is refused at the door (413), never acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from bridge.delivery.topics import (
    DOOR_HEADROOM_BYTES,
    RECORD_HEADROOM_BYTES,
    TopicFacts,
    create_topics,
    inspect_topics,
    required_topics,
)
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import SEED_COMPLETED_VIDEO, bridge_settings, callback_url, running_bridge


async def facts_of_every_topic(settings: Settings, timeout: float = 30.0) -> TopicFacts:
    """The topics' facts once the cluster's metadata shows every one of them (a broker
    may take a moment after creating them)."""
    deadline = time.monotonic() + timeout
    while True:
        facts = await inspect_topics(settings)
        if set(required_topics(settings)) <= set(facts.max_message_bytes):
            return facts
        if time.monotonic() > deadline:
            raise AssertionError(f"topics not all described after {timeout}s: {facts}")
        await asyncio.sleep(0.2)


async def test_topics_create_sets_min_insync_replicas_and_max_message_bytes(
    kafka_broker: KafkaBroker,
) -> None:
    settings = bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)
    await create_topics(settings)
    facts = await facts_of_every_topic(settings)
    expected_min_insync = min(2, settings.topic_replication_factor)
    for topic in required_topics(settings):
        assert facts.min_insync_replicas[topic] == expected_min_insync
        assert facts.max_message_bytes[topic] == settings.max_body_bytes + RECORD_HEADROOM_BYTES


async def test_existing_topics_are_not_altered_and_a_single_replica_is_warned_about(
    kafka_broker: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = bridge_settings(
        kafka_broker.bootstrap,
        kafka_broker.supports_idempotence,
        topic_configs="min.insync.replicas=1",
    )
    await create_topics(settings)
    # Created again with other configs: the existing topics keep theirs.
    again = settings.model_copy(update={"topic_configs": {"min.insync.replicas": "2"}})
    await create_topics(again)
    facts = await facts_of_every_topic(again)
    assert set(facts.min_insync_replicas.values()) == {1}
    # A bridge whose settings expect replicated topics is warned that these are not.
    expecting_three = again.model_copy(update={"topic_replication_factor": 3})
    with caplog.at_level(logging.INFO, logger="bridge.server"):
        async with running_bridge(expecting_three, create=False):
            pass
    warnings = [r for r in caplog.records if "single replica" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING], warnings
    assert "min.insync.replicas=2" in warnings[0].getMessage()
    # One that asks for a single replica itself (`dev`) is told, not warned.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bridge.server"):
        async with running_bridge(again, create=False):
            pass
    told = [r for r in caplog.records if "single replica" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.INFO], told


async def test_a_body_the_topic_cannot_take_is_refused_at_the_door(
    kafka_broker: KafkaBroker,
) -> None:
    max_message_bytes = 20_000
    settings = bridge_settings(
        kafka_broker.bootstrap,
        kafka_broker.supports_idempotence,
        topic_configs=f"max.message.bytes={max_message_bytes}",
    )
    largest = max_message_bytes - DOOR_HEADROOM_BYTES
    too_large = {**SEED_COMPLETED_VIDEO, "request": {"prompt": "x" * largest}}
    fits = {**SEED_COMPLETED_VIDEO, "request": {"prompt": "x" * (largest - 1000)}}
    async with running_bridge(settings) as server, aiohttp.ClientSession() as http:
        async with http.post(callback_url(server), json=too_large) as response:
            assert response.status == 413
            answer = await response.json()
            assert answer["status"] == "rejected"
            assert f"larger than {largest} bytes" in answer["error"]
        far_too_large = {**SEED_COMPLETED_VIDEO, "request": {"prompt": "x" * max_message_bytes}}
        async with http.post(callback_url(server), json=far_too_large) as response:
            assert response.status == 413
        async with http.post(callback_url(server), json=fits) as response:
            assert response.status == 200, await response.text()
        sample = server.metrics.registry.get_sample_value
        labels = {"state": "none", "outcome": "rejected"}
        assert sample("luma_bridge_callbacks_total", labels) == 2
        assert sample("luma_bridge_spool_records") in (None, 0.0)
