"""Creating and checking the bridge's topics on the cluster."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from bridge.contract.callback import Topics
from bridge.settings import Settings, security_options

log = logging.getLogger("bridge.delivery.topics")


def topics_of(settings: Settings) -> Topics:
    return Topics(settings.topic_prefix)


def required_topics(settings: Settings) -> tuple[str, ...]:
    """Every topic `serve` writes with these settings."""
    return topics_of(settings).all(lifecycle=settings.lifecycle_topic)


def _admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.kafka_client_id}-admin",
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **security_options(settings),
    )


async def existing_topics(settings: Settings) -> set[str]:
    admin = _admin_client(settings)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def missing_topics(settings: Settings) -> list[str]:
    """The required topics the cluster does not have."""
    present = await existing_topics(settings)
    return [name for name in required_topics(settings) if name not in present]


async def create_topics(settings: Settings) -> dict[str, str]:
    """Create every required topic that is missing; returns `{topic: "created"|"exists"}`.

    Idempotent: running it again changes nothing.
    """
    admin = _admin_client(settings)
    await admin.start()
    try:
        present = set(await admin.list_topics())
        outcome = {name: "exists" for name in required_topics(settings) if name in present}
        for name in required_topics(settings):
            if name in present:
                continue
            topic = NewTopic(
                name,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication_factor,
                topic_configs=dict(settings.topic_configs),
            )
            try:
                response = await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                outcome[name] = "exists"
                continue
            if _raise_for_topic_errors(response):
                # Listed as missing a moment ago: a broker's metadata lags behind creation.
                outcome[name] = "exists"
                continue
            outcome[name] = "created"
            log.info("topic created", extra={"fields": {"topic": name}})
        return outcome
    finally:
        await admin.close()


def _raise_for_topic_errors(response: object) -> bool:
    """Raise for a refused topic; True when the topic already existed."""
    existed = False
    for topic, code, message, *_ in getattr(response, "topic_errors", []):
        if code == TopicAlreadyExistsError.errno:
            existed = True
            continue
        if code:
            raise KafkaError(f"cannot create topic {topic}: error {code} {message or ''}".strip())
    return existed
