"""The compatibility matrix, measured: each pinned Apache Kafka release by what the bridge needs.

Every row of docs/kafka-compatibility.md is one test here, run against each release in
`KAFKA_VERSIONS` (4.x and 3.9): produce with acks=all, the idempotent producer (proved from
the broker's own log segments), consumer groups, topic creation with configs read back,
SASL/SCRAM-SHA-512 and TLS (the broker's SASL_SSL listener, its certificate from a test CA).
"""

from __future__ import annotations

import ssl
import struct
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from bridge.delivery.compat import check_broker
from bridge.delivery.publisher import KafkaPublisher, Record
from bridge.delivery.topics import create_topics
from bridge.ops.metrics import Metrics
from bridge.settings import Settings, load_settings
from tests.conftest import kafka_version, start_apache_kafka
from tests.helpers import (
    SEED_COMPLETED_VIDEO,
    TOKEN,
    callback_url,
    read_topic,
    running_bridge,
    topics_visible,
)
from tests.kafka.launcher import KAFKA_VERSIONS, KafkaCluster

pytestmark = pytest.mark.integration

NO_PRODUCER_ID = -1


@pytest.fixture(scope="module", params=sorted(KAFKA_VERSIONS.values(), reverse=True))
def kafka(request: pytest.FixtureRequest) -> Iterator[KafkaCluster]:
    """One combined node of each pinned release, with a SCRAM user on a SASL_SSL listener."""
    if request.param == kafka_version():  # the integration suite's node: no second JVM
        yield request.getfixturevalue("apache_kafka")
        return
    cluster = start_apache_kafka(request.param, secure=True)
    try:
        yield cluster
    finally:
        cluster.remove()


def plain_settings(kafka: KafkaCluster, **overrides: Any) -> Settings:
    """The bridge's production defaults (idempotence and acks=all are not overridden here)."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka.bootstrap,
        "topic_prefix": f"compat.{uuid.uuid4().hex[:10]}",
        "topic_replication_factor": 1,
        "topic_partitions": 2,
        "auth_tokens": TOKEN,
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "drain_delay": 0,
        "spool_dir": tempfile.mkdtemp(prefix="luma-compat-spool-"),
        **overrides,
    }
    return load_settings(**values)


def secure_settings(kafka: KafkaCluster, **overrides: Any) -> Settings:
    """The chart's Strimzi shape: SASL/SCRAM-SHA-512 over TLS, the broker's CA trusted."""
    assert kafka.secure is not None
    return plain_settings(
        kafka,
        kafka_bootstrap_servers=f"127.0.0.1:{kafka.secure.port}",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=kafka.secure.mechanism,
        kafka_sasl_username=kafka.secure.user,
        kafka_sasl_password=kafka.secure.password,
        kafka_ssl_cafile=kafka.secure.ca_file,
        **overrides,
    )


def producer_ids_on_disk(kafka: KafkaCluster, topic: str) -> list[int]:
    """The producer id of every record batch of `topic` in the broker's log segments.

    Read from the files the broker wrote, not from the client: a batch from a
    non-idempotent producer carries producer id -1.
    """
    ids = []
    data_dir = Path(str(kafka.nodes[0].properties["log.dirs"]))
    for segment in sorted(data_dir.glob(f"{topic}-*/*.log")):
        blob = segment.read_bytes()
        position = 0
        while position + 61 <= len(blob):  # 61 bytes: a v2 record batch header
            (batch_length,) = struct.unpack_from(">i", blob, position + 8)
            magic = blob[position + 16]
            assert magic == 2, f"record batch magic {magic} in {segment}"
            (producer_id,) = struct.unpack_from(">q", blob, position + 43)
            ids.append(producer_id)
            position += 12 + batch_length
    return ids


async def publish_one(settings: Settings, topic: str) -> None:
    async with KafkaPublisher(settings, metrics=Metrics(CollectorRegistry())) as publisher:
        await publisher.publish([Record(topic, b"gen-1", b"{}", [("h", b"v")])], ack_timeout=30)


async def test_produce_with_acks_all(kafka: KafkaCluster) -> None:
    settings = plain_settings(kafka, kafka_enable_idempotence=False)
    await create_topics(settings)
    await topics_visible(settings)
    topic = f"{settings.topic_prefix}.lifecycle"
    await publish_one(settings, topic)
    records = await read_topic(kafka.bootstrap, topic, expected=1)
    assert [r.key for r in records] == [b"gen-1"]


async def test_the_default_producer_is_idempotent_on_the_broker(kafka: KafkaCluster) -> None:
    settings = plain_settings(kafka)  # the default: nothing about idempotence is set
    await create_topics(settings)
    await topics_visible(settings)
    await check_broker(settings)  # the start-up check finds nothing missing
    topic = f"{settings.topic_prefix}.lifecycle"
    await publish_one(settings, topic)
    ids = producer_ids_on_disk(kafka, topic)
    assert ids, "no record batch on disk"
    assert all(pid != NO_PRODUCER_ID for pid in ids), f"batches without a producer id: {ids}"


async def test_the_disk_check_sees_a_non_idempotent_producer(kafka: KafkaCluster) -> None:
    """The control: with idempotence off, the same check finds producer id -1."""
    settings = plain_settings(kafka, kafka_enable_idempotence=False)
    await create_topics(settings)
    await topics_visible(settings)
    topic = f"{settings.topic_prefix}.lifecycle"
    await publish_one(settings, topic)
    assert producer_ids_on_disk(kafka, topic) == [NO_PRODUCER_ID]


async def test_consumer_groups_commit_and_resume(kafka: KafkaCluster) -> None:
    topic = f"compat.group.{uuid.uuid4().hex[:8]}"
    settings = plain_settings(kafka, kafka_enable_idempotence=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for n in range(4):
            await producer.send_and_wait(topic, f"v{n}".encode(), key=f"k{n}".encode())
    finally:
        await producer.stop()
    group = f"compat-{uuid.uuid4().hex[:8]}"

    async def read(expected: int) -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            while len(values) < expected:
                batch = await consumer.getmany(timeout_ms=30000)
                assert batch, f"group {group} got nothing within 30 s after {values}"
                values += [r.value for rs in batch.values() for r in rs]
            await consumer.commit()
            return values
        finally:
            await consumer.stop()

    assert sorted(await read(4)) == [b"v0", b"v1", b"v2", b"v3"]
    async with AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group) as probe:
        committed = [await probe.committed(TopicPartition(topic, p)) for p in (0, 1)]
    assert sum(c or 0 for c in committed) == 4


async def test_topic_creation_with_configs_reads_back(kafka: KafkaCluster) -> None:
    configs = {"min.insync.replicas": "1", "max.message.bytes": "2097152"}
    settings = plain_settings(kafka, topic_partitions=3, topic_configs=configs)
    outcome = await create_topics(settings)
    assert set(outcome.values()) == {"created"}
    await topics_visible(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(outcome))
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in outcome]
        responses = await admin.describe_configs(resources)
    finally:
        await admin.close()
    for topic in described:
        assert len(topic["partitions"]) == 3, topic
        assert {len(p["replicas"]) for p in topic["partitions"]} == {1}, topic
    values = {
        (resource[3], entry[0]): entry[1]
        for response in responses
        for resource in response.resources
        for entry in resource[4]
    }
    for topic in outcome:
        for name, value in configs.items():
            assert values[(topic, name)] == value, (topic, name, values.get((topic, name)))


async def test_sasl_scram_over_tls_end_to_end(kafka: KafkaCluster) -> None:
    """The bridge with the chart's Strimzi settings: topics, start-up checks, a callback."""
    settings = secure_settings(kafka)
    async with (
        running_bridge(settings) as server,
        aiohttp.ClientSession() as http,
        http.post(callback_url(server), json=SEED_COMPLETED_VIDEO) as response,
    ):
        assert response.status == 200, await response.text()
    records = await read_topic(kafka.bootstrap, f"{settings.topic_prefix}.lifecycle", expected=1)
    assert records[0].key == SEED_COMPLETED_VIDEO["id"].encode()


async def test_scram_refuses_a_wrong_password(kafka: KafkaCluster) -> None:
    assert kafka.secure is not None
    context = ssl.create_default_context(cafile=str(kafka.secure.ca_file))
    producer = AIOKafkaProducer(
        bootstrap_servers=f"127.0.0.1:{kafka.secure.port}",
        security_protocol="SASL_SSL",
        ssl_context=context,
        sasl_mechanism=kafka.secure.mechanism,
        sasl_plain_username=kafka.secure.user,
        sasl_plain_password="not-the-password",
    )
    with pytest.raises(KafkaError):
        await producer.start()
    await producer.stop()


async def test_tls_refuses_a_client_that_does_not_trust_the_broker(kafka: KafkaCluster) -> None:
    assert kafka.secure is not None
    context = ssl.create_default_context()  # the system CAs only: the test CA is unknown
    producer = AIOKafkaProducer(
        bootstrap_servers=f"127.0.0.1:{kafka.secure.port}",
        security_protocol="SASL_SSL",
        ssl_context=context,
        sasl_mechanism=kafka.secure.mechanism,
        sasl_plain_username=kafka.secure.user,
        sasl_plain_password=kafka.secure.password,
        request_timeout_ms=5000,
    )
    with pytest.raises(KafkaError):
        await producer.start()
    await producer.stop()
