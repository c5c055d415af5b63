"""Creating and checking the bridge's topics on the cluster.

`topics create` makes what `acks=all` needs to mean something: `min.insync.replicas`
(the broker's default, 1, lets a single replica acknowledge) and a
`max.message.bytes` that fits the largest accepted body with its headers (the
broker's default, 1 MiB + 12 bytes, does not). Topics that exist are never altered:
at start-up their configs are read where the broker allows it (`inspect_topics`),
the bridge warns when `acks=all` would mean a single replica, and lowers the body
limit at the door to what the smallest `max.message.bytes` can take, so a body no
topic can hold is refused with 413 instead of acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from bridge.contract.callback import Topics
from bridge.settings import Settings, security_options

log = logging.getLogger("bridge.delivery.topics")

#: What `topics create` adds to MAX_BODY_BYTES for `max.message.bytes`: the key, the
#: headers and the batch framing, with room to spare (the producer's request size too).
RECORD_HEADROOM_BYTES = 64 * 1024
#: What a record may need beyond its body, at most (a 256-character key, the headers,
#: the batch framing): a body is refused at the door when body + this exceeds a topic's
#: `max.message.bytes`.
DOOR_HEADROOM_BYTES = 4 * 1024
MIN_INSYNC_REPLICAS = "min.insync.replicas"
MAX_MESSAGE_BYTES = "max.message.bytes"


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


@contextlib.asynccontextmanager
async def admin_session(admin: AIOKafkaAdminClient) -> AsyncIterator[AIOKafkaAdminClient]:
    """`admin`, started, and closed on the way out, also when its start fails half-way."""
    try:
        await admin.start()
        yield admin
    finally:
        await admin.close()


async def existing_topics(settings: Settings) -> set[str]:
    async with admin_session(_admin_client(settings)) as admin:
        return set(await admin.list_topics())


async def missing_topics(settings: Settings) -> list[str]:
    """The required topics the cluster does not have."""
    present = await existing_topics(settings)
    return [name for name in required_topics(settings) if name not in present]


async def create_topics(settings: Settings) -> dict[str, str]:
    """Create every required topic that is missing; returns `{topic: "created"|"exists"}`.

    Idempotent: running it again changes nothing.
    """
    async with admin_session(_admin_client(settings)) as admin:
        present = set(await admin.list_topics())
        outcome = {name: "exists" for name in required_topics(settings) if name in present}
        for name in required_topics(settings):
            if name in present:
                continue
            topic = NewTopic(
                name,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication_factor,
                topic_configs=creation_configs(settings),
            )
            try:
                response = await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                outcome[name] = "exists"
                continue
            if raise_for_topic_errors(response):
                # Listed as missing a moment ago: a broker's metadata lags behind creation.
                outcome[name] = "exists"
                continue
            outcome[name] = "created"
            log.info("topic created", extra={"fields": {"topic": name}})
        return outcome


def raise_for_topic_errors(response: object) -> bool:
    """Raise for a refused topic; True when the topic already existed."""
    existed = False
    for topic, code, message, *_ in getattr(response, "topic_errors", []):
        if code == TopicAlreadyExistsError.errno:
            existed = True
            continue
        if code:
            raise KafkaError(f"cannot create topic {topic}: error {code} {message or ''}".strip())
    return existed


def min_insync_replicas(settings: Settings) -> int:
    """`TOPIC_MIN_INSYNC_REPLICAS`, or the smaller of 2 and the replication factor."""
    if settings.topic_min_insync_replicas is not None:
        return settings.topic_min_insync_replicas
    return min(2, settings.topic_replication_factor)


def creation_configs(settings: Settings) -> dict[str, str]:
    """The configs `topics create` sets; `TOPIC_CONFIGS` wins over the bridge's own."""
    configs = {
        MIN_INSYNC_REPLICAS: str(min_insync_replicas(settings)),
        MAX_MESSAGE_BYTES: str(settings.max_body_bytes + RECORD_HEADROOM_BYTES),
    }
    configs.update(settings.topic_configs)
    return configs


@dataclass(frozen=True, slots=True)
class TopicFacts:
    """What the cluster says about the bridge's topics (only what it would say)."""

    replication_factor: dict[str, int] = field(default_factory=dict)
    min_insync_replicas: dict[str, int] = field(default_factory=dict)
    max_message_bytes: dict[str, int] = field(default_factory=dict)

    def single_replica_topics(self) -> list[str]:
        """Topics where an `acks=all` acknowledgement may come from one replica alone."""
        names = set(self.replication_factor) | set(self.min_insync_replicas)
        return sorted(
            name
            for name in names
            if self.replication_factor.get(name, 2) < 2 or self.min_insync_replicas.get(name, 2) < 2
        )

    def largest_body(self) -> tuple[int, str] | None:
        """The largest body every topic can take as a record, and the topic that bounds
        it; None when no `max.message.bytes` could be read."""
        if not self.max_message_bytes:
            return None
        topic = min(self.max_message_bytes, key=self.max_message_bytes.__getitem__)
        return self.max_message_bytes[topic] - DOOR_HEADROOM_BYTES, topic


async def inspect_topics(settings: Settings) -> TopicFacts:
    """Replication factors and the configs that matter, of the required topics that exist.

    Reads only (nothing is altered). A broker that does not answer `DescribeConfigs`
    (or refuses it) leaves those configs out: the caller decides what that means.
    """
    names = list(required_topics(settings))
    async with admin_session(_admin_client(settings)) as admin:
        # Only topics that exist: a metadata request naming a missing one may create it.
        listed = set(await admin.list_topics())
        described = await admin.describe_topics([name for name in names if name in listed])
        factors = _replication_factors(described)
        replication = {name: factors[name] for name in names if name in factors}
        present = list(replication)
        try:
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name) for name in present]
            )
        except KafkaError as exc:
            log.info(
                "cannot read the topics' configs; the body limit stays MAX_BODY_BYTES",
                extra={"fields": {"reason": type(exc).__name__}},
            )
            responses = []
    configs = _configs(responses)
    return TopicFacts(
        replication_factor=replication,
        min_insync_replicas=_int_config(configs, MIN_INSYNC_REPLICAS),
        max_message_bytes=_int_config(configs, MAX_MESSAGE_BYTES),
    )


def _replication_factors(described: list[Any]) -> dict[str, int]:
    factors = {}
    for topic in described:
        partitions = topic.get("partitions") or []
        if topic.get("error_code") == 0 and partitions:
            factors[topic["topic"]] = min(len(p.get("replicas") or ()) for p in partitions)
    return factors


def _configs(responses: list[Any]) -> dict[str, dict[str, str]]:
    """`{topic: {config: value}}` from DescribeConfigs responses (any version)."""
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for error_code, _message, _type, name, entries, *_ in getattr(response, "resources", []):
            if error_code:
                continue
            configs[name] = {entry[0]: entry[1] for entry in entries if entry[1] is not None}
    return configs


def _int_config(configs: dict[str, dict[str, str]], key: str) -> dict[str, int]:
    values = {}
    for topic, entries in configs.items():
        value = entries.get(key)
        if value is not None and value.strip().isdigit():
            values[topic] = int(value)
    return values
