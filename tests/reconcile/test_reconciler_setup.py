"""The reconciler's set-up and writes in process, on stand-ins: the state topic it creates or
checks (`ensure_state_topic`, `partition_counts`), the changelog it loads on a partition's
take-over (`load_changelog`), the callback it builds from Luma's answer
(`_callback_from_api`), and what it writes, applies and dead-letters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError
from prometheus_client import CollectorRegistry

import bridge.reconcile.reconciler as reconciler_module
from bridge.delivery.publisher import KafkaPublisher
from bridge.ops.metrics import ReconcilerMetrics
from bridge.reconcile.reconciler import Reconciler, ReconcilerError, belongs_to_bridge
from bridge.reconcile.tracking import Tracked
from bridge.settings import Settings
from tests.reconcile.test_reconciler_decisions import (
    LIFECYCLE,
    NOW,
    FakeAdmin,
    FakeConsumer,
    FakeReader,
    Log,
    Rig,
    StubLuma,
    cluster_settings,
    generation,
    stuck,
)

STATE_TOPIC = "luma.reconciler-state"
BOOTSTRAP = "kafka-a.example:9092,kafka-b.example:9092"


# -- the state topic -------------------------------------------------------------------------


class Cluster(FakeAdmin):
    """The admin client over a dict of topic -> partition count, counting what it is asked.

    A topic in `late` is listed but described without partitions for that many
    descriptions, as Apache Kafka does for a moment after creating it.
    """

    def __init__(self, cluster: dict[str, int]) -> None:
        super().__init__(cluster)
        self.late: dict[str, int] = {}
        self.described: list[list[str]] = []

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        self.described.append(list(topics))
        answer = []
        for topic in topics:
            if self.late.get(topic, 0) > 0:
                self.late[topic] -= 1
                answer.append({"topic": topic, "error_code": 0, "partitions": []})
            else:
                answer.append(
                    {"topic": topic, "error_code": 0, "partitions": [{}] * self.cluster[topic]}
                )
        return answer


class Connections:
    """The settings every admin client and metadata look-up was made with."""

    def __init__(self) -> None:
        self.admin: list[Settings] = []
        self.metadata: list[Settings] = []


@pytest.fixture
def cluster() -> Cluster:
    return Cluster({LIFECYCLE: 3})


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch, cluster: Cluster) -> Connections:
    made = Connections()

    def admin(settings: Settings) -> Cluster:
        made.admin.append(settings)
        return cluster

    async def existing(settings: Settings) -> set[str]:
        made.metadata.append(settings)
        return set(cluster.cluster)

    monkeypatch.setattr(reconciler_module, "_admin", admin)
    monkeypatch.setattr(reconciler_module, "existing_topics", existing)
    # The stand-in shows a topic within a few descriptions: a test that waits longer has
    # found a bug (under mutation testing, each such mutant cost the whole 30 s).
    monkeypatch.setattr(reconciler_module, "TOPIC_VISIBLE_SECONDS", 5.0)
    return made


def settings_of_this_cluster() -> Settings:
    return cluster_settings(kafka_bootstrap_servers=BOOTSTRAP)


def test_the_admin_client_connects_like_the_reconcilers_other_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same cluster, request timeout, SASL credentials; a client id that names its role."""
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(
        reconciler_module, "AIOKafkaAdminClient", lambda **options: made.append(options)
    )
    settings = cluster_settings(
        kafka_bootstrap_servers=BOOTSTRAP,
        kafka_client_id="edge-7",
        kafka_request_timeout_ms=12_000,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="bridge",
        kafka_sasl_password="s3cret",
    )
    reconciler_module._admin(settings)
    assert made == [
        {
            "bootstrap_servers": BOOTSTRAP,
            "client_id": "edge-7-reconciler-admin",
            "request_timeout_ms": 12_000,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "bridge",
            "sasl_plain_password": "s3cret",
        }
    ]


async def test_every_connection_at_start_up_uses_the_reconcilers_settings(
    cluster: Cluster, connections: Connections
) -> None:
    """Bootstrap servers, TLS and SASL come from the settings: a topic just created (listed,
    not described yet) and the changelog topic created meanwhile are asked of the same
    cluster with the same credentials."""
    cluster.late[LIFECYCLE] = 1
    cluster.late[STATE_TOPIC] = 1
    settings = settings_of_this_cluster()
    assert await reconciler_module.ensure_state_topic(settings) == 3
    assert cluster.cluster[STATE_TOPIC] == 3
    assert connections.metadata, "the listed, undescribed lifecycle topic was looked up"
    assert len(connections.admin) >= 4  # counts, the wait for the lifecycle, create, the wait
    assert all(made is settings for made in connections.admin + connections.metadata)


async def test_a_lifecycle_topic_the_cluster_describes_is_not_looked_up_again(
    cluster: Cluster, connections: Connections
) -> None:
    cluster.cluster[STATE_TOPIC] = 3
    assert await reconciler_module.ensure_state_topic(settings_of_this_cluster()) == 3
    assert connections.metadata == []  # no second client for the cached metadata
    assert cluster.described == [[LIFECYCLE, STATE_TOPIC]]
    assert cluster.created == []


async def test_when_none_of_the_topics_exists_none_is_described(
    cluster: Cluster, connections: Connections
) -> None:
    counts = await reconciler_module.partition_counts(settings_of_this_cluster(), ["luma.absent"])
    assert counts == {}
    assert cluster.described == []  # an empty description asks some brokers for every topic
    assert cluster.closed == 1


async def test_without_the_lifecycle_topic_start_up_says_at_once_which_command_creates_it(
    cluster: Cluster, connections: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    del cluster.cluster[LIFECYCLE]
    # A missing topic is not waited for: it is not in the cluster's listing either.
    monkeypatch.setattr(reconciler_module, "TOPIC_VISIBLE_SECONDS", 60.0)
    with pytest.raises(ReconcilerError) as caught:
        await asyncio.wait_for(reconciler_module.ensure_state_topic(settings_of_this_cluster()), 10)
    assert str(caught.value) == (
        f"topic {LIFECYCLE} is missing on {BOOTSTRAP}: create the bridge's topics first "
        "(`luma-kafka-bridge topics create`, same settings)"
    )


async def test_a_changelog_topic_kafka_refuses_says_why_and_what_to_check(
    cluster: Cluster, connections: Connections
) -> None:
    cluster.refuse = 38  # INVALID_REPLICATION_FACTOR
    with pytest.raises(ReconcilerError) as caught:
        await reconciler_module.ensure_state_topic(settings_of_this_cluster())
    assert str(caught.value) == (
        f"KafkaError: cannot create topic {STATE_TOPIC}: error 38 no; check the replication factor "
        "(TOPIC_REPLICATION_FACTOR) and the Kafka user's rights"
    )


async def test_a_changelog_topic_of_another_size_says_how_to_fix_it(
    cluster: Cluster, connections: Connections
) -> None:
    cluster.cluster[STATE_TOPIC] = 5
    with pytest.raises(ReconcilerError) as caught:
        await reconciler_module.ensure_state_topic(settings_of_this_cluster())
    assert str(caught.value) == (
        f"topic {STATE_TOPIC} has 5 partitions but {LIFECYCLE} has 3: they must match; "
        f"delete {STATE_TOPIC} (the reconciler rebuilds it from the lifecycle topic) or give "
        "it the same partition count"
    )
    assert cluster.created == []


async def test_creating_the_changelog_topic_is_logged_with_its_name_and_size(
    cluster: Cluster, connections: Connections, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.reconcile")
    await reconciler_module.ensure_state_topic(settings_of_this_cluster())
    [line] = [r for r in caplog.records if r.name == "bridge.reconcile"]
    assert line.getMessage() == "changelog topic created"
    assert line.levelno == logging.INFO
    assert line.fields == {"topic": STATE_TOPIC, "partitions": 3}  # type: ignore[attr-defined]


async def test_a_topic_created_a_moment_ago_is_asked_for_again_within_a_fraction_of_a_second(
    cluster: Cluster, connections: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up is not held up longer than the metadata lags: the cluster is asked again
    every 0.2 s (the pauses are recorded, not timed)."""
    cluster.cluster[STATE_TOPIC] = 3
    cluster.late[LIFECYCLE] = 4
    pauses: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float, *args: Any) -> Any:
        pauses.append(delay)
        return await sleep(0, *args)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    assert await reconciler_module.ensure_state_topic(settings_of_this_cluster()) == 3
    assert pauses == [0.2, 0.2, 0.2]


# -- the changelog ---------------------------------------------------------------------------


class ChangelogReader(FakeReader):
    """The changelog's reader as aiokafka behaves: a position only of an assigned partition,
    a fetch of at most `fetch_size` records per partition, a poll that waits a bounded time."""

    def __init__(self, log: Log, fetch_size: int = 2) -> None:
        super().__init__(log)
        self.fetch_size = fetch_size
        self.polls: list[tuple[set[TopicPartition], int]] = []

    async def position(self, tp: TopicPartition) -> int:
        if tp not in self.assigned:
            raise IllegalStateError(f"No current assignment for partition {tp}")
        return self.positions.get(tp, 0)

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        self.polls.append((set(tps), timeout_ms))
        batch = {}
        for tp in sorted(tps or self.assigned):
            start = self.positions.get(tp, 0)
            records = self.log.records[(tp.topic, tp.partition)][start : start + self.fetch_size]
            if records:
                batch[tp] = list(records)
                self.positions[tp] = records[-1].offset + 1
        await asyncio.sleep(0)
        return batch


def entry(state: str, seen_at: float) -> bytes:
    return orjson.dumps({"state": state, "seen_at": seen_at})


async def load(
    monkeypatch: pytest.MonkeyPatch, log: Log, partitions: list[int], **reader: Any
) -> tuple[dict[int, dict[str, Tracked]], ChangelogReader]:
    made: list[ChangelogReader] = []

    def consumer(**options: Any) -> ChangelogReader:
        made.append(ChangelogReader(log, **reader))
        return made[-1]

    monkeypatch.setattr(reconciler_module, "AIOKafkaConsumer", consumer)
    entries = await asyncio.wait_for(
        reconciler_module.load_changelog(cluster_settings(), STATE_TOPIC, partitions), 10
    )
    [used] = made
    assert used.stopped
    return entries, used


async def test_a_changelog_longer_than_one_fetch_is_read_to_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = Log()
    for n in range(7):
        log.append(STATE_TOPIC, 1, f"g{n}".encode(), entry("queued", float(n)))
    log.append(STATE_TOPIC, 1, b"g0", entry("completed", 10.0))
    entries, reader = await load(monkeypatch, log, [0, 1], fetch_size=2)
    assert entries[0] == {}
    assert entries[1] == {
        "g0": Tracked("completed", 10.0),
        **{f"g{n}": Tracked("queued", float(n)) for n in range(1, 7)},
    }
    assert len(reader.polls) == 4
    # Each poll waits for records a bounded, non-zero time: no busy loop, no hang.
    assert all(0 < timeout <= 1000 for _, timeout in reader.polls)


async def test_an_empty_changelog_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    entries, reader = await load(monkeypatch, Log(), [0, 1, 2])
    assert entries == {0: {}, 1: {}, 2: {}}
    assert reader.polls == []  # a take-over of empty partitions does not wait for a poll


async def test_a_record_without_a_key_does_not_hide_the_entries_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = Log()
    log.append(STATE_TOPIC, 0, None, entry("queued", 1.0))
    log.append(STATE_TOPIC, 0, b"a", entry("dreaming", 2.0))
    entries, _ = await load(monkeypatch, log, [0], fetch_size=10)
    assert entries == {0: {"a": Tracked("dreaming", 2.0)}}


async def test_a_tombstone_whose_entry_was_compacted_away_is_read_past(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compaction keeps a tombstone for a while after removing the entries it deletes."""
    log = Log()
    log.append(STATE_TOPIC, 0, b"gone", None)
    log.append(STATE_TOPIC, 0, b"a", entry("queued", 1.0))
    entries, _ = await load(monkeypatch, log, [0])
    assert entries == {0: {"a": Tracked("queued", 1.0)}}


async def test_an_entry_whose_key_is_not_utf8_is_loaded_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = Log()
    log.append(STATE_TOPIC, 0, b"\xffg", entry("queued", 1.0))
    log.append(STATE_TOPIC, 0, b"a", entry("queued", 2.0))
    entries, _ = await load(monkeypatch, log, [0])
    assert entries == {0: {"\ufffdg": Tracked("queued", 1.0), "a": Tracked("queued", 2.0)}}


# -- following the lifecycle topic -----------------------------------------------------------


def record(offset: int, key: bytes | None, headers: list[tuple[str, bytes]]) -> SimpleNamespace:
    return SimpleNamespace(
        offset=offset, key=key, value=b"{}", headers=headers, timestamp=int(NOW * 1000)
    )


async def test_records_whose_key_or_state_is_not_utf8_do_not_stop_the_following() -> None:
    rig = Rig()
    tp = TopicPartition(LIFECYCLE, 0)
    rig.reconciler._apply(
        {
            tp: [
                record(0, b"\xffa", [("luma-state", b"queued")]),
                record(1, b"b", [("luma-state", b"\xffqueued")]),
                record(2, b"c", [("luma-state", b"dreaming")]),
            ]
        }
    )
    assert rig.reconciler.tracker.get(0, "\ufffda") == Tracked("queued", NOW)
    assert rig.reconciler.tracker.get(0, "c") == Tracked("dreaming", NOW)
    assert rig.reconciler._applied == {0: 3}


class RefusingSeek(FakeConsumer):
    def __init__(self, log: Log, partitions: Sequence[int], error: Exception) -> None:
        super().__init__(log, partitions)
        self.error = error

    def seek(self, tp: TopicPartition, offset: int) -> None:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        IllegalStateError("No current assignment for partition"),  # handed back meanwhile
        AssertionError("bad offset"),
        ValueError("offset must be >= 0"),
    ],
    ids=["unassigned", "assertion", "value"],
)
async def test_records_of_a_partition_not_taken_over_never_stop_the_others(
    error: Exception,
) -> None:
    """aiokafka fetches for a partition before the take-over: its records are read again
    later (a seek back), and when the seek is refused the other partitions still go on."""
    rig = Rig(partitions=2, ours=(0,))
    rig.reconciler._consumer = RefusingSeek(rig.log, (0, 1), error)
    rig.reconciler._apply(
        {
            TopicPartition(LIFECYCLE, 1): [record(0, b"x", [("luma-state", b"queued")])],
            TopicPartition(LIFECYCLE, 0): [record(0, b"g", [("luma-state", b"queued")])],
        }
    )
    assert rig.reconciler.tracker.get(0, "g") == Tracked("queued", NOW)
    assert rig.reconciler._applied == {0: 1}


# -- Luma's answer, and what is written --------------------------------------------------------


async def test_an_answer_that_is_not_a_generation_is_logged_with_the_id_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.bodies["g"] = b"not json"
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if "not a valid Generation" in r.getMessage()]
    assert line.getMessage() == "Luma's API answered something that is not a valid Generation"
    assert line.levelno == logging.WARNING
    assert line.fields == {"generation_id": "g", "reason": "body is not valid UTF-8 JSON"}  # type: ignore[attr-defined]


async def test_an_answer_about_another_generation_is_logged_with_the_id_asked_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.bodies["g"] = orjson.dumps(generation("other", "completed"))
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if "another generation" in r.getMessage()]
    assert line.getMessage() == "Luma's API answered with another generation's id"
    assert line.levelno == logging.WARNING
    assert line.fields == {"generation_id": "g"}  # type: ignore[attr-defined]
    assert rig.publisher.published == []


async def test_both_records_of_a_repair_carry_lumas_generation() -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    await rig.reconciler.reconcile_once()
    per_state, lifecycle = rig.publisher.published
    assert (per_state.topic, lifecycle.topic) == ("luma.completed", LIFECYCLE)
    assert per_state.value == lifecycle.value
    assert orjson.loads(per_state.value)["assets"] == {"video": "https://cdn.example/g.mp4"}
    assert per_state.headers == lifecycle.headers


@pytest.mark.parametrize("cloudevents", [True, False])
async def test_repairs_carry_cloudevents_headers_only_when_configured(cloudevents: bool) -> None:
    rig = Rig(cloudevents=cloudevents)
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    await rig.reconciler.reconcile_once()
    for written in rig.publisher.published:
        names = {name for name, _ in written.headers}
        assert ("ce_id" in names) is cloudevents
        assert ("ce_source" in names) is cloudevents


async def test_a_write_kafka_does_not_acknowledge_is_logged_with_the_id_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    rig.publisher.fail = "timeout"
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if "did not acknowledge" in r.getMessage()]
    assert line.getMessage() == "Kafka did not acknowledge a reconciled state; retrying next pass"
    assert line.levelno == logging.WARNING
    assert line.fields == {"generation_id": "g", "reason": "timeout"}  # type: ignore[attr-defined]


async def test_a_dead_letter_kafka_does_not_acknowledge_is_logged_with_the_id_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)  # Luma's API does not know "g"
    rig.publisher.fail = "KafkaTimeoutError"
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if "did not acknowledge" in r.getMessage()]
    assert line.fields == {"generation_id": "g", "reason": "KafkaTimeoutError"}  # type: ignore[attr-defined]


async def test_a_generation_that_finished_meanwhile_is_not_dead_lettered() -> None:
    """Luma's API forgot it, but its last state landed since the last read: reading the
    partition to its end first finds it finished, and nothing is written."""
    rig = Rig()
    await stuck(rig)
    rig.log.state("g", "completed", at=NOW - 10)  # landed, not read yet
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert rig.sample("luma_bridge_reconciler_deadletters_total") == 0
    assert rig.reconciler.tracker.get(0, "g") == Tracked("completed", NOW - 10, done=True)


async def test_a_dead_letter_is_logged_saying_tracking_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig, state="dreaming")
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if "dead-letter topic" in r.getMessage()]
    assert line.getMessage() == (
        "Luma's API does not know this generation; written to the dead-letter topic, tracking ended"
    )
    assert line.levelno == logging.WARNING


# -- which callback URLs are this bridge's ---------------------------------------------------


def test_a_public_url_keeps_its_last_character() -> None:
    public = "https://bridge.example.com/hooks/lumaX"
    assert belongs_to_bridge(f"{public}/write-token", public)
    assert belongs_to_bridge(f"{public}/", public + "/")
    assert not belongs_to_bridge("https://bridge.example.com/hooks/luma/write-token", public)


def test_a_callback_path_that_only_starts_like_ours_is_not_ours() -> None:
    public = "https://bridge.example.com/luma/callback"
    assert not belongs_to_bridge(f"{public}X/write-token", public)
    assert not belongs_to_bridge(f"{public}-other", public)
    for ours in (public, f"{public}/t", f"{public}?token=t", f"{public}#t"):
        assert belongs_to_bridge(ours, public)


# -- construction ----------------------------------------------------------------------------


def test_without_the_lifecycle_topic_the_reconciler_says_what_to_set() -> None:
    with pytest.raises(ReconcilerError) as caught:
        Rig(lifecycle_topic=False)
    assert str(caught.value) == (
        "the reconciler follows the lifecycle topic: set LUMA_BRIDGE_LIFECYCLE_TOPIC=true "
        "on the bridge and here"
    )


async def test_a_reconciler_is_neither_started_nor_connected_until_start() -> None:
    """Made without a publisher, it makes its own producer (connected by `start()`); before
    then it is not ready but counts as alive, and stopping it is safe."""
    before = time.monotonic()
    settings = Settings.model_validate({"lifecycle_topic": True})
    metrics = ReconcilerMetrics(CollectorRegistry())
    reconciler = Reconciler(settings, luma=StubLuma(), metrics=metrics)  # type: ignore[arg-type]
    assert isinstance(reconciler._publisher, KafkaPublisher)
    assert not reconciler.started
    assert before <= reconciler.last_tick <= time.monotonic()
    await reconciler.stop()
    assert not reconciler.started
