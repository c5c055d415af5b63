"""`topics create`'s durability configs and what the start-up check makes of a topic's."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.delivery.topics import (
    DOOR_HEADROOM_BYTES,
    RECORD_HEADROOM_BYTES,
    TopicFacts,
    admin_session,
    creation_configs,
)
from bridge.settings import SettingsError, load_settings


def test_topics_get_min_insync_replicas_and_room_for_the_largest_body() -> None:
    settings = load_settings(topic_replication_factor=3, max_body_bytes=2 * 1024 * 1024)
    assert creation_configs(settings) == {
        "min.insync.replicas": "2",
        "max.message.bytes": str(2 * 1024 * 1024 + RECORD_HEADROOM_BYTES),
    }


def test_a_single_replica_cluster_keeps_working() -> None:
    # `dev` and one-broker clusters: min.insync.replicas above the replicas would refuse
    # every acks=all write.
    settings = load_settings(topic_replication_factor=1)
    assert creation_configs(settings)["min.insync.replicas"] == "1"


def test_the_setting_and_topic_configs_choose_and_topic_configs_win() -> None:
    settings = load_settings(topic_replication_factor=5, topic_min_insync_replicas=3)
    assert creation_configs(settings)["min.insync.replicas"] == "3"
    both = load_settings(
        topic_min_insync_replicas=3,
        topic_configs="min.insync.replicas=1,max.message.bytes=5000000,retention.ms=1",
    )
    assert creation_configs(both) == {
        "min.insync.replicas": "1",
        "max.message.bytes": "5000000",
        "retention.ms": "1",
    }


def test_min_insync_replicas_above_the_replication_factor_stops_start_up() -> None:
    with pytest.raises(SettingsError, match="LUMA_BRIDGE_TOPIC_MIN_INSYNC_REPLICAS"):
        load_settings(topic_replication_factor=2, topic_min_insync_replicas=3)


def test_single_replica_topics_are_named() -> None:
    facts = TopicFacts(
        replication_factor={"a": 3, "b": 3, "c": 1},
        min_insync_replicas={"a": 2, "b": 1, "c": 1},
    )
    assert facts.single_replica_topics() == ["b", "c"]
    assert TopicFacts(replication_factor={"a": 3}).single_replica_topics() == []


def test_the_smallest_max_message_bytes_bounds_the_body() -> None:
    facts = TopicFacts(max_message_bytes={"a": 2_000_000, "b": 1_048_588})
    assert facts.largest_body() == (1_048_588 - DOOR_HEADROOM_BYTES, "b")
    assert TopicFacts().largest_body() is None


class Admin:
    """An admin client whose start fails (a broker gone mid-bootstrap) or not."""

    def __init__(self, start_fails: bool) -> None:
        self.start_fails = start_fails
        self.closed = False

    async def start(self) -> None:
        if self.start_fails:
            raise OSError("connection refused")

    async def close(self) -> None:
        self.closed = True


async def failing_session(admin: Any) -> None:
    async with admin_session(admin) as running:
        assert running is admin
        raise OSError("refused by the caller")


@pytest.mark.parametrize("start_fails", [False, True])
async def test_an_admin_client_is_closed_however_its_session_ends(start_fails: bool) -> None:
    admin = Admin(start_fails)
    with pytest.raises(OSError, match="refused"):
        await failing_session(admin)
    assert admin.closed
