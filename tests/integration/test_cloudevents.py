"""CloudEvents on the wire: the official SDK's Kafka binding reads the bridge's records.

Records are read back from the real broker and given to `cloudevents`' `from_binary`
(the `cloudevents.core.bindings.kafka` API of the 2.x SDK, and the older
`cloudevents.v1.kafka` one that Knative-era code uses).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.v1 import kafka as ce_v1_kafka

from bridge.consume.consumer import GenerationConsumer
from bridge.contract.callback import DEFAULT_CLOUDEVENTS_SOURCE, parse_timestamp, transition_id
from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.consume.support import follow, generation, new_group, nothing_more, send, take
from tests.helpers import SEED_COMPLETED_VIDEO, bridge_settings, read_topic, running_bridge

pytestmark = pytest.mark.integration


def as_message(record: Any) -> ce_kafka.KafkaMessage:
    """An aiokafka record as the SDK's binding takes it."""
    return ce_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)


async def test_the_sdk_reads_every_attribute_and_the_data_of_a_real_record(
    bridge: BridgeServer, settings: Settings
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    await send(bridge, SEED_COMPLETED_VIDEO)
    topic = f"{settings.topic_prefix}.completed"
    (record,) = await read_topic(settings.kafka_bootstrap_servers, topic, expected=1)
    (lifecycle,) = await read_topic(
        settings.kafka_bootstrap_servers, f"{settings.topic_prefix}.lifecycle", expected=1
    )

    for read in (record, lifecycle):
        event = ce_kafka.from_binary_event(as_message(read))
        expected_id = transition_id(
            SEED_COMPLETED_VIDEO["id"], "completed", SEED_COMPLETED_VIDEO["assets"]
        )
        assert event.get_specversion() == "1.0"
        assert event.get_id() == expected_id
        assert event.get_source() == DEFAULT_CLOUDEVENTS_SOURCE
        assert event.get_type() == "ai.lumalabs.generation.completed"
        assert event.get_subject() == SEED_COMPLETED_VIDEO["id"]
        assert event.get_datacontenttype() == "application/json"
        headers = dict(read.headers)
        time = event.get_time()
        assert time == parse_timestamp(headers["luma-received-at"].decode())
        assert time is not None
        assert before <= time <= datetime.now(UTC)
        assert event.get_data() == SEED_COMPLETED_VIDEO
        assert event.get_extension("partitionkey") == SEED_COMPLETED_VIDEO["id"]
        assert headers["luma-transition-id"].decode() == expected_id

    legacy = ce_v1_kafka.from_binary(
        ce_v1_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value),
        data_unmarshaller=json.loads,
    )
    assert legacy["id"] == event.get_id()
    assert legacy["type"] == "ai.lumalabs.generation.completed"
    assert legacy["source"] == DEFAULT_CLOUDEVENTS_SOURCE
    assert legacy.get_data() == SEED_COMPLETED_VIDEO


async def test_the_switch_turns_the_ce_headers_off_and_the_source_is_configurable(
    kafka_broker: KafkaBroker,
) -> None:
    off = bridge_settings(
        kafka_broker.bootstrap, kafka_broker.supports_idempotence, cloudevents=False
    )
    async with running_bridge(off) as server:
        await send(server, SEED_COMPLETED_VIDEO)
    (record,) = await read_topic(
        off.kafka_bootstrap_servers, f"{off.topic_prefix}.completed", expected=1
    )
    names = [name for name, _ in record.headers]
    assert not [name for name in names if name.startswith("ce_")], names
    assert "luma-transition-id" in names

    custom = bridge_settings(
        kafka_broker.bootstrap,
        kafka_broker.supports_idempotence,
        cloudevents_source="urn:example:luma-bridge",
    )
    async with running_bridge(custom) as server:
        await send(server, SEED_COMPLETED_VIDEO)
    (record,) = await read_topic(
        custom.kafka_bootstrap_servers, f"{custom.topic_prefix}.completed", expected=1
    )
    assert ce_kafka.from_binary_event(as_message(record)).get_source() == "urn:example:luma-bridge"


async def test_dead_letters_carry_no_cloudevents_attributes(
    bridge: BridgeServer, settings: Settings
) -> None:
    await send(bridge, b'{"id": "x", "state": 7}', status=400)
    (letter,) = await read_topic(
        settings.kafka_bootstrap_servers, f"{settings.topic_prefix}.deadletter", expected=1
    )
    assert sorted(name for name, _ in letter.headers) == ["luma-error", "luma-received-at"]


async def test_the_consumer_counts_one_transition_once_whatever_the_body(
    bridge: BridgeServer, kafka_broker: KafkaBroker, settings: Settings
) -> None:
    # The same moment told twice with different bodies (as a callback and an API read
    # would): two event ids, one transition. Progress in `dreaming` is a new transition.
    first = generation("gen-t", "completed")
    retold = {**first, "request": {"prompt": "as the API returns it"}}
    dreaming = generation("gen-t2", "dreaming", assets={"progress_video": "https://cdn/1.mp4"})
    further = generation("gen-t2", "dreaming", assets={"progress_video": "https://cdn/2.mp4"})
    for body in (first, retold, dreaming, further):
        await send(bridge, body)

    async with follow(kafka_broker, settings, group_id=new_group(), lifecycle=True) as events:
        seen = await take(events, 3)
        assert sorted((e.generation_id, e.state) for e in seen) == [
            ("gen-t", "completed"),
            ("gen-t2", "dreaming"),
            ("gen-t2", "dreaming"),
        ]
        assert len({e.transition_id for e in seen}) == 3
        await nothing_more(events)
    async with GenerationConsumer(
        settings=settings, group_id=None, lifecycle=True, skip_duplicates=False
    ) as everything:
        all_four = await take(everything, 4)
    duplicates = [e for e in all_four if e.duplicate]
    assert [(e.generation_id, e.event_id != e.transition_id) for e in duplicates] == [
        ("gen-t", True)
    ]
