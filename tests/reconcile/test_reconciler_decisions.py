"""The reconciler's decisions in process, on stand-ins for Kafka's consumer and producers and
for Luma's API (found by mutation testing; `test_reconcile_*.py` run the same against a real
broker): what a pass looks up and writes, what it leaves alone and why, dead letters,
a refused key, discovery's window and paging, reading a partition to its end before
acting, checkpoints, partitions taken over and handed back, and the gauges."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, ClassVar
from unittest.mock import ANY

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from prometheus_client import CollectorRegistry

import bridge.reconcile.reconciler as reconciler_module
from bridge.contract.callback import RECONCILE_NOT_FOUND_ERROR
from bridge.delivery.pacing import METADATA_BACKOFF_SECONDS
from bridge.delivery.publisher import KafkaUnavailable, Placement, Record
from bridge.ops.metrics import ReconcilerMetrics
from bridge.reconcile.luma import GenerationNotFound, KeyRejected, LumaAPIError
from bridge.reconcile.reconciler import (
    PAGE_OVERLAP,
    PAGE_SIZE,
    WRITE_TIMEOUT,
    Reconciler,
    ReconcilerError,
    group_id,
    partition_of,
    state_topic,
)
from bridge.reconcile.tracking import Tracked, decode_entry
from bridge.settings import Settings
from tests.helpers import wait_until

PUBLIC_URL = "https://bridge.example.com/luma/callback"
NOW = 1_800_000_000.0  # the reconciler's clock in these tests
LIFECYCLE = "luma.lifecycle"


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def generation(gid: str, state: str, *, created: float = NOW - 600, **extra: Any) -> dict[str, Any]:
    return {
        "id": gid,
        "state": state,
        "created_at": iso(created),
        "assets": {"video": f"https://cdn.example/{gid}.mp4"} if state == "completed" else {},
        "request": {"prompt": "p", "callback_url": f"{PUBLIC_URL}/write-token"},
        **extra,
    }


class Log:
    """What Kafka holds: records by (topic, partition), offsets from 0."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], list[SimpleNamespace]] = defaultdict(list)

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        timestamp_ms: int = int(NOW * 1000),
    ) -> Placement:
        records = self.records[(topic, partition)]
        records.append(
            SimpleNamespace(
                offset=len(records),
                key=key,
                value=value,
                headers=list(headers),
                timestamp=timestamp_ms,
            )
        )
        return Placement(topic, partition, len(records) - 1)

    def state(self, gid: str, state: str, partition: int = 0, at: float = NOW - 3600) -> None:
        headers = [("luma-state", state.encode())]
        self.append(LIFECYCLE, partition, gid.encode(), b"{}", headers, int(at * 1000))


class FakeConsumer:
    """aiokafka's consumer as the reconciler uses it, over a `Log`."""

    def __init__(self, log: Log, partitions: Sequence[int]) -> None:
        self.log = log
        self.assigned = {TopicPartition(LIFECYCLE, p) for p in partitions}
        self.positions: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.fail_commit = False
        self.asked = 0
        self.silent = False  # a poll waits for good, as while a group join hangs
        self._client = self  # aiokafka's client: a stop cut off closes it first
        self.client_closed = False

    async def close(self) -> None:
        self.client_closed = True

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.log.records[(tp.topic, tp.partition)]) for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions.get(tp, 0)

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        self.asked += 1
        if self.silent:
            await asyncio.Event().wait()
        batch = self.take(tps)
        await asyncio.sleep(0 if batch else 0.005)  # an empty poll waits a little, as Kafka's
        return batch

    def take(self, tps: tuple[TopicPartition, ...]) -> dict[TopicPartition, list[SimpleNamespace]]:
        """The records past each partition's position (all assigned ones without `tps`)."""
        batch = {}
        for tp in sorted(tps or self.assigned):
            records = self.log.records[(tp.topic, tp.partition)][self.positions.get(tp, 0) :]
            if records:
                batch[tp] = list(records)
                self.positions[tp] = records[-1].offset + 1
        return batch

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.fail_commit:
            raise KafkaConnectionError()
        self.commits.append(dict(offsets))


class LogPublisher:
    """The reconciler's producer: appends to the log in key order, or fails."""

    def __init__(self, log: Log, partitions: int) -> None:
        self.log = log
        self.partitions = partitions
        self.published: list[Record] = []
        self.timeouts: list[float] = []
        self.fail: str | None = None

    async def publish(self, records: Sequence[Record], ack_timeout: float) -> list[Placement]:
        self.timeouts.append(ack_timeout)
        if self.fail is not None:
            raise KafkaUnavailable(self.fail)
        placements = []
        for record in records:
            self.published.append(record)
            partition = partition_of(record.key.decode(), self.partitions) if record.key else 0
            placements.append(
                self.log.append(record.topic, partition, record.key, record.value, record.headers)
            )
        return placements


class Changelog:
    """The changelog producer: `send` returns a future, as aiokafka's does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, int]] = []
        self.fail = False
        self.silent = False  # a send waits for good, as with Kafka frozen

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes, partition: int
    ) -> asyncio.Future[None]:
        if self.fail:
            raise KafkaConnectionError()
        if self.silent:
            await asyncio.Event().wait()
        self.sent.append((topic, value, key, partition))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class StubLuma:
    """Luma's API: generations newest first, or an error per generation id."""

    def __init__(self) -> None:
        self.generations: dict[str, dict[str, Any]] = {}
        self.bodies: dict[str, bytes] = {}
        self.errors: dict[str, LumaAPIError] = {}
        self.list_error: LumaAPIError | None = None
        self.list_body: bytes | None = None
        self.gets: list[str] = []
        self.pages: list[tuple[int, int]] = []
        self.silent = False  # every request waits for good, as on an API that stopped answering
        self.abandoned = 0

    async def _maybe_never_answer(self) -> None:
        if not self.silent:
            return
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.abandoned += 1
            raise

    def put(self, document: dict[str, Any]) -> None:
        self.generations.pop(document["id"], None)
        self.generations = {document["id"]: document, **self.generations}

    async def get(self, gid: str) -> bytes:
        self.gets.append(gid)
        await self._maybe_never_answer()
        if gid in self.errors:
            raise self.errors[gid]
        if gid in self.bodies:
            return self.bodies[gid]
        if gid not in self.generations:
            raise GenerationNotFound()
        return orjson.dumps(self.generations[gid])

    async def list_page(self, *, limit: int, offset: int) -> bytes:
        self.pages.append((limit, offset))
        await self._maybe_never_answer()
        if self.list_error is not None:
            raise self.list_error
        if self.list_body is not None:
            return self.list_body
        listed = list(self.generations.values())
        page = listed[offset : offset + limit]
        return orjson.dumps({"generations": page, "has_more": offset + limit < len(listed)})


class Rig:
    def __init__(self, *, partitions: int = 1, ours: Sequence[int] = (0,), **overrides: Any):
        values: dict[str, Any] = {
            "lifecycle_topic": True,
            "topic_prefix": "luma",
            "reconcile_after_seconds": 300.0,
            "reconcile_lookback_seconds": 86_400.0,
            "reconcile_interval_seconds": 60.0,
            "public_url": None,
            **overrides,
        }
        self.settings = Settings.model_validate(values)
        self.log = Log()
        self.luma = StubLuma()
        self.publisher = LogPublisher(self.log, partitions)
        self.changelog = Changelog()
        self.metrics = ReconcilerMetrics(CollectorRegistry())
        self.now = NOW
        self.reconciler = Reconciler(
            self.settings,
            luma=self.luma,  # type: ignore[arg-type]
            metrics=self.metrics,
            publisher=self.publisher,  # type: ignore[arg-type]
            clock=lambda: self.now,
        )
        self.reconciler._lifecycle_partitions = partitions
        self.consumer = FakeConsumer(self.log, ours)
        self.reconciler._consumer = self.consumer
        self.reconciler._changelog = self.changelog
        for partition in ours:
            self.reconciler.tracker.assign(partition)

    async def read(self) -> None:
        self.reconciler._apply(await self.consumer.getmany())

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def written(self) -> list[tuple[str, str | None]]:
        return [
            (r.topic, dict(r.headers).get("luma-state", b"").decode() or None)
            for r in self.publisher.published
        ]


def lookups(rig: Rig, outcome: str) -> float:
    return rig.sample("luma_bridge_reconciler_lookups_total", outcome=outcome)


# -- settings ------------------------------------------------------------------------------


def test_the_reconciler_needs_the_lifecycle_topic() -> None:
    with pytest.raises(ReconcilerError, match="LUMA_BRIDGE_LIFECYCLE_TOPIC=true"):
        Rig(lifecycle_topic=False)


def test_names_follow_the_prefix_and_the_client_id() -> None:
    settings = Settings.model_validate({"topic_prefix": "acme", "kafka_client_id": "edge-7"})
    assert state_topic(settings) == "acme.reconciler-state"
    assert group_id(settings) == "edge-7-reconciler"
    assert group_id(Settings.model_validate({"reconcile_group_id": "mine"})) == "mine"


def test_discovery_needs_a_public_url() -> None:
    assert not Rig(public_url=None).reconciler.discovering
    assert Rig(public_url=PUBLIC_URL).reconciler.discovering
    assert not Rig(public_url=PUBLIC_URL, reconcile_discover=False).reconciler.discovering


# -- following the lifecycle topic -----------------------------------------------------------


async def test_records_are_followed_by_key_state_header_and_timestamp() -> None:
    rig = Rig()
    rig.log.state("g", "queued", at=NOW - 100)
    rig.log.append(LIFECYCLE, 0, None, b"{}", [("luma-state", b"queued")])  # no key
    rig.log.append(LIFECYCLE, 0, b"h", b"{}", [("other", b"x")])  # no state header
    rig.log.state("g", "dreaming", at=NOW - 50)
    await rig.read()
    assert rig.reconciler.tracker.get(0, "g") == Tracked("dreaming", NOW - 50)
    assert rig.reconciler.tracker.get(0, "h") is None
    assert rig.reconciler._applied == {0: 4}


async def test_records_of_a_partition_not_yet_taken_over_are_read_again_later() -> None:
    rig = Rig(partitions=2, ours=(0,))
    rig.consumer.assigned.add(TopicPartition(LIFECYCLE, 1))
    rig.log.state("x", "queued", partition=1)
    rig.log.state("x", "dreaming", partition=1)
    await rig.read()
    assert rig.consumer.seeks == [(TopicPartition(LIFECYCLE, 1), 0)]
    assert 1 not in rig.reconciler._applied
    assert rig.reconciler.tracker.get(1, "x") is None


# -- a pass: stuck generations ----------------------------------------------------------------


async def stuck(rig: Rig, gid: str = "g", state: str = "queued", at: float = NOW - 3600) -> None:
    rig.log.state(gid, state, at=at)
    await rig.read()


async def test_a_stuck_generation_gets_the_state_luma_reports() -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    await rig.reconciler.reconcile_once()
    assert rig.written() == [("luma.completed", "completed"), (LIFECYCLE, "completed")]
    record = rig.publisher.published[1]
    assert record.key == b"g"
    headers = dict(record.headers)
    assert headers["luma-source"] == b"reconciler"
    assert b"write-token" not in record.value  # the write token redacted
    assert orjson.loads(record.value)["request"]["callback_url"].endswith("/REDACTED")
    assert rig.publisher.timeouts == [WRITE_TIMEOUT]
    assert rig.reconciler.tracker.get(0, "g") == Tracked("completed", NOW, done=True)
    assert lookups(rig, "repaired") == 1
    written = "luma_bridge_reconciler_records_written_total"
    assert rig.sample(written, state="completed", kind="stale") == 1
    assert rig.sample("luma_bridge_reconciler_passes_total") == 1
    assert rig.sample("luma_bridge_reconciler_last_pass_timestamp_seconds") == NOW
    # Acted on once: the next pass finds it done.
    await rig.reconciler.reconcile_once()
    assert rig.luma.gets == ["g"]


async def test_a_repair_is_logged_with_what_kafka_held_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.reconcile")
    rig = Rig()
    await stuck(rig, state="dreaming")
    rig.luma.put(generation("g", "completed"))
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if r.getMessage().startswith("wrote a state")]
    assert line.getMessage() == "wrote a state its callback never delivered"
    assert line.fields == {  # type: ignore[attr-defined]
        "generation_id": "g",
        "state": "completed",
        "kind": "stale",
        "before": "dreaming",
    }


async def test_a_generation_silent_for_exactly_the_threshold_is_not_looked_up_yet() -> None:
    rig = Rig()
    await stuck(rig, at=NOW - 300)
    rig.luma.put(generation("g", "completed"))
    await rig.reconciler.reconcile_once()
    assert rig.luma.gets == []
    rig.now = NOW + 1
    await rig.reconciler.reconcile_once()
    assert rig.luma.gets == ["g"]


async def test_nothing_later_at_luma_confirms_and_waits_a_full_period_again() -> None:
    rig = Rig()
    await stuck(rig, state="dreaming")
    rig.luma.put(generation("g", "queued"))  # Luma's API lags: an earlier state
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert rig.reconciler.tracker.get(0, "g") == Tracked("dreaming", NOW - 3600, checked_at=NOW)
    assert lookups(rig, "unchanged") == 1
    rig.now = NOW + 300
    await rig.reconciler.reconcile_once()
    assert rig.luma.gets == ["g"]  # not again before RECONCILE_AFTER_SECONDS


async def test_the_same_state_at_luma_is_unchanged() -> None:
    rig = Rig()
    await stuck(rig, state="dreaming")
    rig.luma.put(generation("g", "dreaming"))
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert lookups(rig, "unchanged") == 1


async def test_a_state_written_meanwhile_is_read_before_acting_and_not_written_again() -> None:
    """The receiver (or a previous run) wrote `completed` after the last read: reading the
    partition to its end first finds it, so nothing is written twice."""
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    rig.log.state("g", "completed", at=NOW - 10)  # landed, not read yet
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert lookups(rig, "unchanged") == 1
    assert rig.reconciler.tracker.get(0, "g") == Tracked("completed", NOW - 10, done=True)


async def test_a_generation_luma_does_not_know_is_dead_lettered_and_no_longer_tracked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig, state="dreaming")
    await rig.reconciler.reconcile_once()
    [record] = rig.publisher.published
    assert record.topic == "luma.deadletter"
    assert record.key is None
    assert orjson.loads(record.value) == {"id": "g", "last_state": "dreaming"}
    headers = dict(record.headers)
    assert headers["luma-error"] == RECONCILE_NOT_FOUND_ERROR.encode()
    assert headers["luma-received-at"].startswith(iso(NOW)[:19].encode())
    assert rig.reconciler.tracker.get(0, "g") == Tracked("dreaming", NOW - 3600, NOW, True)
    assert lookups(rig, "not_found") == 1
    assert rig.sample("luma_bridge_reconciler_deadletters_total") == 1
    [line] = [r for r in caplog.records if "does not know this generation" in r.getMessage()]
    assert line.fields == {"generation_id": "g", "last_state": "dreaming"}  # type: ignore[attr-defined]
    await rig.reconciler.reconcile_once()
    assert rig.luma.gets == ["g"]


async def test_a_dead_letter_that_cannot_be_written_is_tried_next_pass() -> None:
    rig = Rig()
    await stuck(rig)
    rig.publisher.fail = "timeout"
    await rig.reconciler.reconcile_once()
    assert lookups(rig, "not_found") == 0
    assert rig.reconciler.tracker.get(0, "g") == Tracked("queued", NOW - 3600)
    rig.publisher.fail = None
    await rig.reconciler.reconcile_once()
    assert [r.topic for r in rig.publisher.published] == ["luma.deadletter"]


async def test_a_refused_key_stops_every_lookup_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    rig.metrics.ready.set(1)
    await stuck(rig, "a", at=NOW - 4000)
    await stuck(rig, "b", at=NOW - 3000)
    rig.luma.errors["a"] = KeyRejected("unauthorized", 401)
    await rig.reconciler.reconcile_once()
    await rig.reconciler.reconcile_once()
    assert rig.luma.gets == ["a"]
    assert rig.reconciler.key_rejected
    assert rig.sample("luma_bridge_reconciler_ready") == 0
    refused = [r for r in caplog.records if "refused the API key" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno == logging.ERROR


async def test_an_api_error_is_counted_logged_and_retried_next_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.errors["g"] = LumaAPIError("server_error", 503)
    await rig.reconciler.reconcile_once()
    assert lookups(rig, "error") == 1
    [line] = [r for r in caplog.records if "did not answer a lookup" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.fields == {"generation_id": "g", "reason": "server_error", "status": 503}  # type: ignore[attr-defined]
    del rig.luma.errors["g"]
    rig.luma.put(generation("g", "failed"))
    await rig.reconciler.reconcile_once()
    assert rig.written() == [("luma.failed", "failed"), (LIFECYCLE, "failed")]


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        (b"not json", "error"),
        (orjson.dumps({"id": "other", "state": "completed"}), "error"),
        (orjson.dumps({"id": "g", "state": "paused"}), "unknown_state"),
        (orjson.dumps({"id": "g"}), "error"),
    ],
)
async def test_an_answer_that_cannot_be_written_is_not(body: bytes, outcome: str) -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.bodies["g"] = body
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert lookups(rig, outcome) == 1
    assert rig.reconciler.tracker.get(0, "g") == Tracked("queued", NOW - 3600)


async def test_a_write_kafka_does_not_acknowledge_is_retried_next_pass() -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    rig.publisher.fail = "timeout"
    await rig.reconciler.reconcile_once()
    assert lookups(rig, "error") == 1
    assert 0 not in rig.reconciler._known_end  # it may still land: read again first
    assert rig.reconciler.tracker.get(0, "g") == Tracked("queued", NOW - 3600)
    rig.publisher.fail = None
    await rig.reconciler.reconcile_once()
    assert lookups(rig, "repaired") == 1


async def test_the_known_end_moves_past_our_own_record_only() -> None:
    rig = Rig()
    await stuck(rig, "a", at=NOW - 4000)
    await stuck(rig, "b", at=NOW - 3000)
    rig.luma.put(generation("a", "completed"))
    rig.luma.put(generation("b", "completed"))
    await rig.reconciler.reconcile_once()
    # Both written; after each write the end known is right past the record just written.
    assert rig.reconciler._known_end == {0: len(rig.log.records[(LIFECYCLE, 0)])}


async def test_an_unowned_or_restoring_partition_is_not_acted_on() -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    rig.reconciler._restoring.add(0)
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert lookups(rig, "error") == 1
    rig.reconciler._restoring.clear()
    rig.consumer.assigned.clear()  # the group moved it away
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []


async def test_a_stopping_reconciler_looks_nothing_up() -> None:
    rig = Rig()
    await stuck(rig)
    stopping = asyncio.Event()
    stopping.set()
    await rig.reconciler.reconcile_once(stopping)
    assert rig.luma.gets == []


async def run_until(rig: Rig, condition: Callable[[], bool], *, what: str) -> None:
    """Run the main loop until `condition` holds, then stop it; the stop must end the loop
    within 5 s, whatever it was waiting for."""
    stopping = asyncio.Event()
    loop = asyncio.create_task(rig.reconciler.run(stopping))
    try:
        await wait_until(condition, timeout=10, what=what)
    finally:
        stopping.set()
        await asyncio.wait_for(loop, timeout=5)


async def stop_while_luma_is_silent(rig: Rig, asked: Callable[[], bool]) -> None:
    """Stop the loop once Luma's API has been asked and not answered: the stop must not wait
    for an answer (its timeouts and retries outlast Kubernetes' grace period)."""
    rig.luma.silent = True
    await run_until(rig, asked, what="a request to Luma's API")


async def test_a_stop_abandons_a_lookup_luma_has_not_answered() -> None:
    rig = Rig(reconcile_interval_seconds=0.1)
    await stuck(rig)
    await stop_while_luma_is_silent(rig, lambda: bool(rig.luma.gets))
    assert rig.luma.abandoned == 1
    assert rig.publisher.published == []
    assert lookups(rig, "error") == 0  # abandoned, not failed: the next owner looks it up


async def test_a_stop_abandons_a_listing_luma_has_not_answered() -> None:
    rig = Rig(reconcile_interval_seconds=0.1, public_url=PUBLIC_URL)
    rig.luma.put(generation("ours", "completed"))
    await stop_while_luma_is_silent(rig, lambda: bool(rig.luma.pages))
    assert rig.luma.abandoned == 1
    assert rig.publisher.published == []


async def test_finished_entries_older_than_the_lookback_and_an_hour_are_pruned() -> None:
    rig = Rig()
    limit = NOW - 86_400 - 3600
    await stuck(rig, "old", "completed", at=limit - 1)
    await stuck(rig, "edge", "completed", at=limit)
    await rig.reconciler.reconcile_once()
    assert rig.reconciler.tracker.get(0, "old") is None
    assert rig.reconciler.tracker.get(0, "edge") is not None


# -- discovery --------------------------------------------------------------------------------


async def test_discovery_writes_this_bridges_generations_kafka_never_saw() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.put(generation("ours", "completed"))
    rig.luma.put(generation("foreign", "completed", request={"callback_url": "https://x/y"}))
    rig.luma.put(generation("young", "completed", created=NOW - 100))
    rig.luma.put(generation("old", "completed", created=NOW - 90_000))
    rig.luma.put(generation("nodate", "completed", created_at=None))
    rig.luma.put(generation("seen", "completed"))
    rig.log.state("seen", "queued", at=NOW - 10)
    await rig.read()
    await rig.reconciler.reconcile_once()
    assert [(r.key, r.topic) for r in rig.publisher.published] == [
        (b"ours", "luma.completed"),
        (b"ours", LIFECYCLE),
    ]
    written = "luma_bridge_reconciler_records_written_total"
    assert rig.sample(written, state="completed", kind="discovered") == 1
    assert rig.luma.pages == [(PAGE_SIZE, 0)]


async def test_a_pass_before_start_says_so_instead_of_dividing_by_zero() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.reconciler._lifecycle_partitions = 0  # as constructed: start() reads the topic's count
    rig.luma.put(generation("ours", "completed"))
    with pytest.raises(ReconcilerError) as caught:
        await rig.reconciler.reconcile_once()
    assert str(caught.value) == "the reconciler is not started: call start() first"
    assert rig.luma.pages == []


async def test_discovery_takes_the_window_edges_and_skips_non_generations() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.list_body = orjson.dumps(
        {
            "generations": [
                generation("oldest", "failed", created=NOW - 86_400),
                generation("youngest", "failed", created=NOW - 300),
                "not a generation",
                {"id": "", "state": "failed"},
                {"id": 7, "state": "failed"},
            ],
            "has_more": False,
        }
    )
    rig.luma.put(generation("oldest", "failed", created=NOW - 86_400))
    rig.luma.put(generation("youngest", "failed", created=NOW - 300))
    await rig.reconciler.reconcile_once()
    assert {r.key for r in rig.publisher.published} == {b"oldest", b"youngest"}


async def test_discovery_leaves_other_reconcilers_partitions_alone() -> None:
    rig = Rig(public_url=PUBLIC_URL, partitions=2, ours=(0,))
    gids = [f"gen-{n}" for n in range(8)]
    for gid in gids:
        rig.luma.put(generation(gid, "completed"))
    await rig.reconciler.reconcile_once()
    written = {r.key.decode() for r in rig.publisher.published if r.key}
    assert written == {gid for gid in gids if partition_of(gid, 2) == 0}
    assert 0 < len(written) < len(gids)


async def test_discovery_pages_with_an_overlap_and_stops_at_the_end() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    for n in range(PAGE_SIZE + 10):
        rig.luma.put(generation(f"g{n:04}", "dreaming", created=NOW - 1000 - n))
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == [(PAGE_SIZE, 0), (PAGE_SIZE, PAGE_SIZE - PAGE_OVERLAP)]
    keys = [r.key for r in rig.publisher.published if r.topic == LIFECYCLE]
    assert len(keys) == len(set(keys)) == PAGE_SIZE + 10  # the overlap written once


async def test_discovery_stops_paging_when_a_whole_page_is_too_old() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    for n in range(2 * PAGE_SIZE):
        rig.luma.put(generation(f"old{n:04}", "dreaming", created=NOW - 100_000 - n))
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == [(PAGE_SIZE, 0)]


async def test_discovery_reads_a_full_page_without_has_more_as_more() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    page = [generation(f"g{n:04}", "dreaming") for n in range(PAGE_SIZE)]
    rig.luma.list_body = orjson.dumps({"generations": page})
    await rig.reconciler.reconcile_once()
    assert len(rig.luma.pages) >= 2


@pytest.mark.parametrize(
    "body", [b"[]", orjson.dumps({"generations": []}), orjson.dumps({"generations": "x"})]
)
async def test_discovery_stops_on_an_empty_or_odd_page(body: bytes) -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.list_body = body
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == [(PAGE_SIZE, 0)]
    assert rig.publisher.published == []


async def test_discovery_stops_when_luma_cannot_list(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.list_error = LumaAPIError("server_error", 500)
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if r.getMessage().startswith("discovery stopped")]
    assert line.fields == {"reason": "server_error"}  # type: ignore[attr-defined]
    assert rig.luma.pages == [(PAGE_SIZE, 0)]
    assert rig.sample("luma_bridge_reconciler_passes_total") == 1


async def test_discovery_with_a_refused_key_stops_everything() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.list_error = KeyRejected("unauthorized", 403)
    await rig.reconciler.reconcile_once()
    assert rig.reconciler.key_rejected
    await rig.reconciler.reconcile_once()
    assert len(rig.luma.pages) == 1


async def test_a_generation_discovered_then_seen_in_kafka_is_not_written() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.put(generation("g", "completed"))
    original = rig.luma.list_page

    async def listed_then_landed(*, limit: int, offset: int) -> bytes:
        page = await original(limit=limit, offset=offset)
        rig.log.state("g", "completed", at=NOW - 5)  # its callback lands meanwhile
        return page

    rig.luma.list_page = listed_then_landed  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []


# -- checkpoints, taking over and handing back ----------------------------------------------


async def test_a_checkpoint_writes_the_changes_then_commits_what_they_account_for() -> None:
    rig = Rig(partitions=2, ours=(0, 1))
    gid = next(f"g{n}" for n in range(50) if partition_of(f"g{n}", 2) == 1)
    rig.log.state(gid, "queued", partition=1)
    await rig.read()
    committed = await rig.reconciler._checkpoint(rig.consumer)
    [(topic, value, key, partition)] = rig.changelog.sent
    assert (topic, key, partition) == ("luma.reconciler-state", gid.encode(), 1)
    assert decode_entry(value) == Tracked("queued", NOW - 3600)
    assert rig.consumer.commits == [{TopicPartition(LIFECYCLE, 1): 1}]
    assert committed == {"1": 1}
    # Nothing changed since: nothing sent; a pruned entry is a tombstone.
    await rig.reconciler._checkpoint(rig.consumer)
    assert len(rig.changelog.sent) == 1
    rig.reconciler.tracker.finish(1, gid, NOW - 100_000)
    rig.reconciler.tracker.prune(NOW)
    await rig.reconciler._checkpoint(rig.consumer)
    assert rig.changelog.sent[-1] == ("luma.reconciler-state", None, gid.encode(), 1)


async def test_a_checkpoint_that_fails_keeps_the_changes_and_commits_nothing() -> None:
    rig = Rig()
    await stuck(rig)
    rig.changelog.fail = True
    with pytest.raises(KafkaConnectionError):
        await rig.reconciler._checkpoint(rig.consumer)
    assert rig.consumer.commits == []
    rig.changelog.fail = False
    await rig.reconciler._checkpoint(rig.consumer)
    assert [key for _, _, key, _ in rig.changelog.sent] == [b"g"]


async def test_a_checkpoint_commits_only_partitions_still_assigned() -> None:
    rig = Rig(partitions=2, ours=(0, 1))
    rig.log.state("a", "queued", partition=0)
    rig.log.state("b", "queued", partition=1)
    await rig.read()
    rig.consumer.assigned.discard(TopicPartition(LIFECYCLE, 1))
    await rig.reconciler._checkpoint(rig.consumer)
    assert rig.consumer.commits == [{TopicPartition(LIFECYCLE, 0): 1}]


async def test_a_checkpoint_without_a_changelog_producer_does_nothing() -> None:
    rig = Rig()
    await stuck(rig)
    rig.reconciler._changelog = None
    assert await rig.reconciler._checkpoint(rig.consumer) == {}
    assert rig.consumer.commits == []


async def test_taking_over_restores_the_changelog_and_blocks_until_it_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(partitions=3, ours=())
    loads: list[list[int]] = []
    fail = [True]

    async def load(settings: Settings, topic: str, partitions: list[int]) -> dict[int, Any]:
        loads.append(partitions)
        assert topic == "luma.reconciler-state"
        if fail[0]:
            raise KafkaConnectionError()
        return {1: {"saved": Tracked("dreaming", NOW - 7200)}}

    monkeypatch.setattr(reconciler_module, "load_changelog", load)
    assigned = [TopicPartition(LIFECYCLE, 2), TopicPartition(LIFECYCLE, 1)]
    await rig.reconciler.take_over(assigned)
    assert loads == [[1, 2]]
    assert rig.reconciler.tracker.partitions == {1, 2}
    assert rig.reconciler._restoring == {1, 2}
    assert rig.reconciler._restore_failed == {1, 2}
    await rig.reconciler.take_over(assigned)  # nothing new: not loaded again
    assert loads == [[1, 2]]
    fail[0] = False
    await rig.reconciler.reconcile_once()  # a pass retries the restore first
    assert loads[-1] == [1, 2]
    assert rig.reconciler._restoring == set()
    assert rig.reconciler._restore_failed == set()
    assert rig.reconciler.tracker.get(1, "saved") == Tracked("dreaming", NOW - 7200)
    assert rig.sample("luma_bridge_reconciler_generations_tracked") == 1


async def test_handing_back_saves_then_forgets_the_partitions() -> None:
    rig = Rig(partitions=2, ours=(0, 1))
    rig.log.state("a", "queued", partition=0)
    rig.log.state("b", "queued", partition=1)
    await rig.read()
    rig.reconciler._known_end[1] = 1
    rig.reconciler._restoring.add(1)
    rig.reconciler._restore_failed.add(1)
    await rig.reconciler.release([TopicPartition(LIFECYCLE, 1)])
    assert len(rig.changelog.sent) == 2
    assert rig.consumer.commits  # saved first
    assert rig.reconciler.tracker.partitions == {0}
    assert 1 not in rig.reconciler._known_end
    assert 1 not in rig.reconciler._applied
    assert 1 not in rig.reconciler._restoring | rig.reconciler._restore_failed
    assert rig.reconciler._applied == {0: 1}


async def test_handing_back_when_the_save_fails_still_forgets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)
    rig.changelog.fail = True
    await rig.reconciler.release([TopicPartition(LIFECYCLE, 0)])
    assert rig.reconciler.tracker.partitions == set()
    assert any("could not save the state of revoked" in r.getMessage() for r in caplog.records)


# -- gauges -----------------------------------------------------------------------------------


async def test_the_stuck_gauge_counts_by_state_and_silence() -> None:
    rig = Rig()
    await stuck(rig, "q", "queued", at=NOW - 1000)
    await stuck(rig, "d", "dreaming", at=NOW - 5 * 3600)
    await stuck(rig, "fresh", "dreaming", at=NOW - 10)
    rig.reconciler._update_gauges()
    assert rig.sample("luma_bridge_reconciler_generations_tracked") == 3
    gauge = "luma_bridge_reconciler_stuck_generations"
    assert rig.sample(gauge, state="queued", age="30m") == 1
    assert rig.sample(gauge, state="dreaming", age="6h") == 1
    assert (
        sum(s.value for m in rig.metrics.registry.collect() for s in m.samples if s.name == gauge)
        == 2
    )


# -- the cluster: topics, the changelog, start and stop, the loop -----------------------------


class FakeAdmin:
    """The admin client over a dict of topic -> partition count."""

    def __init__(self, cluster: dict[str, int], *, refuse: int = 0) -> None:
        self.cluster = cluster
        self.created: list[Any] = []
        self.refuse = refuse
        self.closed = 0
        self.odd: dict[str, dict[str, Any]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.closed += 1

    async def list_topics(self) -> list[str]:
        return list(self.cluster)

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        return [
            self.odd.get(t) or {"topic": t, "error_code": 0, "partitions": [{}] * self.cluster[t]}
            for t in topics
        ]

    async def create_topics(self, topics: list[Any]) -> Any:
        self.created.extend(topics)
        if self.refuse:
            return SimpleNamespace(topic_errors=[(topics[0].name, self.refuse, "no", None)])
        for topic in topics:
            self.cluster[topic.name] = topic.num_partitions
        return SimpleNamespace(topic_errors=[(t.name, 0, None, None) for t in topics])


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    fake = FakeAdmin({LIFECYCLE: 3})
    monkeypatch.setattr(reconciler_module, "_admin", lambda settings: fake)
    # The fake shows a topic at once: a test that waits longer has found a bug (under
    # mutation testing, each such mutant cost the whole 30 s).
    monkeypatch.setattr(reconciler_module, "TOPIC_VISIBLE_SECONDS", 5.0)

    async def existing(settings: Settings) -> set[str]:
        return set(fake.cluster)

    monkeypatch.setattr(reconciler_module, "existing_topics", existing)
    return fake


def cluster_settings(**overrides: Any) -> Settings:
    return Settings.model_validate(
        {
            "lifecycle_topic": True,
            "topic_prefix": "luma",
            "topic_replication_factor": 1,
            **overrides,
        }
    )


async def test_partition_counts_are_of_existing_described_topics_only(admin: FakeAdmin) -> None:
    admin.cluster["luma.odd"] = 2
    admin.cluster["luma.empty"] = 0
    admin.odd["luma.odd"] = {"topic": "luma.odd", "error_code": 3, "partitions": [{}]}
    counts = await reconciler_module.partition_counts(
        cluster_settings(), [LIFECYCLE, "luma.odd", "luma.empty", "luma.absent"]
    )
    assert counts == {LIFECYCLE: 3}
    assert admin.closed == 1
    assert await reconciler_module.partition_counts(cluster_settings(), ["luma.absent"]) == {}


async def test_the_changelog_topic_is_created_compacted_like_the_lifecycle_topic(
    admin: FakeAdmin,
) -> None:
    assert await reconciler_module.ensure_state_topic(cluster_settings()) == 3
    [topic] = admin.created
    assert (topic.name, topic.num_partitions, topic.replication_factor) == (
        "luma.reconciler-state",
        3,
        1,
    )
    assert topic.topic_configs == {"cleanup.policy": "compact"}
    assert admin.cluster["luma.reconciler-state"] == 3
    assert await reconciler_module.ensure_state_topic(cluster_settings()) == 3
    assert len(admin.created) == 1  # there now: not created again


async def test_without_the_lifecycle_topic_the_reconciler_says_what_to_create(
    admin: FakeAdmin,
) -> None:
    del admin.cluster[LIFECYCLE]
    with pytest.raises(ReconcilerError) as caught:
        await reconciler_module.ensure_state_topic(cluster_settings())
    assert str(caught.value).startswith(f"topic {LIFECYCLE} is missing on ")
    assert "`luma-kafka-bridge topics create`" in str(caught.value)


async def test_a_changelog_topic_of_another_size_is_refused(admin: FakeAdmin) -> None:
    admin.cluster["luma.reconciler-state"] = 5
    with pytest.raises(ReconcilerError) as caught:
        await reconciler_module.ensure_state_topic(cluster_settings())
    assert str(caught.value).startswith(
        f"topic luma.reconciler-state has 5 partitions but {LIFECYCLE} has 3: they must match"
    )


async def test_a_changelog_topic_kafka_refuses_to_create_says_what_to_check(
    admin: FakeAdmin,
) -> None:
    admin.refuse = 38  # INVALID_REPLICATION_FACTOR
    with pytest.raises(ReconcilerError, match="check the replication factor"):
        await reconciler_module.ensure_state_topic(cluster_settings())


async def test_a_topic_created_a_moment_ago_is_waited_for_then_given_up(
    admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin.odd[LIFECYCLE] = {"topic": LIFECYCLE, "error_code": 0, "partitions": []}
    monkeypatch.setattr(reconciler_module, "TOPIC_VISIBLE_SECONDS", 0.3)
    with pytest.raises(ReconcilerError, match="is not in the cluster's metadata after 0 s"):
        await reconciler_module.ensure_state_topic(cluster_settings())

    async def appear_soon() -> None:
        await asyncio.sleep(0.1)
        del admin.odd[LIFECYCLE]

    task = asyncio.create_task(appear_soon())
    admin.odd[LIFECYCLE] = {"topic": LIFECYCLE, "error_code": 0, "partitions": []}
    assert await reconciler_module.ensure_state_topic(cluster_settings()) == 3
    await task


class FakeReader(FakeConsumer):
    """The changelog reader: assigned partitions read from the start."""

    instances: ClassVar[list[FakeReader]] = []

    def __init__(self, log: Log, **options: Any) -> None:
        super().__init__(log, ())
        self.options = options
        self.stopped = False
        FakeReader.instances.append(self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = set(tps)

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = 0


async def test_the_changelog_is_read_to_its_end_latest_entry_winning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = Log()
    topic = "luma.reconciler-state"
    entry = b'{"state":"queued","seen_at":1.0}'
    later = b'{"state":"dreaming","seen_at":2.0}'
    log.append(topic, 0, b"a", entry)
    log.append(topic, 0, b"a", later)
    log.append(topic, 0, b"b", entry)
    log.append(topic, 0, b"b", None)  # a tombstone
    log.append(topic, 0, None, entry)  # no key: ignored
    log.append(topic, 0, b"c", entry)
    log.append(topic, 0, b"c", b"garbage")  # unreadable: as a tombstone
    log.append(topic, 2, b"z", entry)
    monkeypatch.setattr(
        reconciler_module, "AIOKafkaConsumer", lambda **options: FakeReader(log, **options)
    )
    FakeReader.instances.clear()
    entries = await reconciler_module.load_changelog(cluster_settings(), topic, [0, 1, 2])
    assert entries == {
        0: {"a": Tracked("dreaming", 2.0)},
        1: {},
        2: {"z": Tracked("queued", 1.0)},
    }
    [reader] = FakeReader.instances
    assert reader.stopped
    assert reader.options["client_id"].endswith("reconciler-state")


class FakeClient:
    def __init__(self, fail: bool = False, **options: Any) -> None:
        self.options = options
        self.fail = fail
        self.started = False
        self.stopped = 0
        self.subscribed: tuple[list[str], Any] | None = None
        self.client = self  # aiokafka's client, whose metadata updates the producer paces
        self.updates: list[tuple[float, float]] = []  # when each metadata update started, ended

    async def start(self) -> None:
        if self.fail:
            raise KafkaConnectionError()
        self.started = True

    async def _metadata_update(self, cluster_metadata: Any, topics: Any) -> bool:
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0)
        self.updates.append((started, asyncio.get_running_loop().time()))
        return True

    async def stop(self) -> None:
        self.stopped += 1

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.subscribed = (topics, listener)


async def test_a_client_that_cannot_start_is_stopped_and_the_error_raised() -> None:
    client = FakeClient(fail=True)
    with pytest.raises(KafkaConnectionError):
        await reconciler_module._started(client)
    assert client.stopped == 1


async def test_start_joins_the_group_on_the_lifecycle_topic_and_stop_leaves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(kafka_client_id="bridge-9")
    made: dict[str, FakeClient] = {}

    async def partitions(settings: Settings) -> int:
        assert settings is rig.settings
        return 4

    def producer(**options: Any) -> FakeClient:
        made["producer"] = FakeClient(**options)
        return made["producer"]

    def consumer(**options: Any) -> FakeClient:
        made["consumer"] = FakeClient(**options)
        return made["consumer"]

    monkeypatch.setattr(reconciler_module, "ensure_state_topic", partitions)
    monkeypatch.setattr(reconciler_module, "AIOKafkaProducer", producer)
    monkeypatch.setattr(reconciler_module, "AIOKafkaConsumer", consumer)
    reconciler = rig.reconciler
    reconciler._consumer = None
    reconciler._changelog = None
    await reconciler.start()
    assert reconciler.started
    assert reconciler._lifecycle_partitions == 4
    options = made["consumer"].options
    assert options["group_id"] == "bridge-9-reconciler"
    assert options["auto_offset_reset"] == "earliest"
    assert options["rebalance_timeout_ms"] == 120_000
    assert options["max_poll_interval_ms"] == 600_000
    assert options["fetch_max_wait_ms"] == 100
    assert options["enable_auto_commit"] is False
    assert options["client_id"] == "bridge-9-reconciler"
    topics, listener = made["consumer"].subscribed  # type: ignore[misc]
    assert topics == [LIFECYCLE]
    assert isinstance(listener, reconciler_module._Revocations)
    assert listener._reconciler is reconciler
    assert made["producer"].started
    await reconciler.stop()
    await reconciler.stop()  # twice is safe
    assert not reconciler.started
    assert made["consumer"].stopped == 1
    assert made["producer"].stopped == 1


async def test_the_changelog_producer_asks_for_metadata_at_a_paced_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the bridge's own producer (bridge.delivery.pacing): while a changelog partition
    has no leader, aiokafka's sender would ask again as soon as each answer came."""
    made: list[FakeClient] = []

    async def partitions(settings: Settings) -> int:
        return 1

    def producer(**options: Any) -> FakeClient:
        made.append(FakeClient(**options))
        return made[-1]

    monkeypatch.setattr(reconciler_module, "ensure_state_topic", partitions)
    monkeypatch.setattr(reconciler_module, "AIOKafkaProducer", producer)
    monkeypatch.setattr(reconciler_module, "AIOKafkaConsumer", FakeClient)
    reconciler = Rig().reconciler
    reconciler._consumer = None
    reconciler._changelog = None
    await reconciler.start()
    try:
        for _ in range(2):
            await made[0].client._metadata_update(None, None)
    finally:
        await reconciler.stop()
    (_, first_ended), (second_started, _) = made[0].updates
    assert second_started - first_ended >= METADATA_BACKOFF_SECONDS * 0.9


async def test_stop_saves_the_state_and_warns_when_it_cannot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)
    rig.consumer.stop = _async_noop  # type: ignore[attr-defined]
    rig.changelog.stop = _async_noop  # type: ignore[attr-defined]
    rig.changelog.fail = True
    await rig.reconciler.stop()
    assert any(r.getMessage() == "could not save the state at shutdown" for r in caplog.records)
    assert rig.reconciler._consumer is None


async def _async_noop() -> None:
    pass


async def test_a_stop_that_cannot_reach_kafka_ends_within_the_shutdown_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(shutdown_timeout=1.5)
    await stuck(rig)
    rig.consumer.stop = _async_noop  # type: ignore[attr-defined]
    rig.changelog.stop = _async_noop  # type: ignore[attr-defined]
    rig.changelog.silent = True
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(rig.reconciler.stop(), timeout=5)
    took = asyncio.get_running_loop().time() - started
    assert 1.5 - reconciler_module.SHUTDOWN_MARGIN <= took < 1.5 + 0.5
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage().startswith("the state was not saved within SHUTDOWN_TIMEOUT")
    assert rig.consumer.commits == []  # nothing committed past what the changelog holds
    assert rig.consumer.client_closed
    assert not rig.reconciler.started


async def test_a_stop_that_saved_but_cannot_leave_the_group_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(shutdown_timeout=1.5)
    await stuck(rig)
    rig.consumer.stop = asyncio.Event().wait  # type: ignore[attr-defined]
    rig.changelog.stop = _async_noop  # type: ignore[attr-defined]
    await asyncio.wait_for(rig.reconciler.stop(), timeout=5)
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage().startswith("the state was saved, but Kafka did not answer")
    assert rig.consumer.client_closed
    assert rig.consumer.commits == [{TopicPartition(LIFECYCLE, 0): 1}]


async def test_a_checkpoint_cut_off_keeps_its_changes_for_the_next() -> None:
    rig = Rig()
    await stuck(rig)
    rig.changelog.silent = True
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(rig.reconciler._checkpoint(rig.consumer), timeout=0.2)
    assert rig.reconciler.tracker.take_changes() == {0: {"g": ANY}}
    assert rig.consumer.commits == []


async def test_a_stop_abandons_a_poll_kafka_has_not_answered() -> None:
    rig = Rig()
    rig.consumer.silent = True
    await run_until(rig, lambda: rig.consumer.asked > 0, what="a poll")


async def test_the_listener_hands_partitions_to_the_reconciler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(partitions=2, ours=(0,))

    async def load(settings: Settings, topic: str, partitions: list[int]) -> dict[int, Any]:
        return {}

    monkeypatch.setattr(reconciler_module, "load_changelog", load)
    listener = reconciler_module._Revocations(rig.reconciler)
    await listener.on_partitions_assigned([TopicPartition(LIFECYCLE, 1)])
    assert rig.reconciler.tracker.partitions == {0, 1}
    await listener.on_partitions_revoked([TopicPartition(LIFECYCLE, 0)])
    assert rig.reconciler.tracker.partitions == {1}


async def test_the_loop_follows_passes_and_checkpoints_until_stopped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(reconcile_interval_seconds=0.1)
    monkeypatch.setattr(reconciler_module, "CHECKPOINT_SECONDS", 0.1)
    rig.log.state("g", "queued")
    rig.luma.put(generation("g", "completed"))
    await run_until(
        rig,
        lambda: bool(rig.consumer.commits and rig.publisher.published),
        what="a checkpoint and a repair",
    )
    assert rig.written() == [("luma.completed", "completed"), (LIFECYCLE, "completed")]
    assert rig.changelog.sent


async def test_a_pass_that_fails_is_logged_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(reconcile_interval_seconds=0.05)
    calls = 0

    async def broken(stopping: asyncio.Event | None = None) -> None:
        nonlocal calls
        calls += 1
        raise (KafkaConnectionError() if calls == 1 else RuntimeError("bug"))

    monkeypatch.setattr(rig.reconciler, "reconcile_once", broken)
    await run_until(rig, lambda: calls >= 3, what="passes after failures")
    messages = [r.getMessage() for r in caplog.records]
    assert "a pass stopped on a Kafka error; next pass" in messages
    assert "a reconciliation pass failed; next pass" in messages


async def test_a_producer_that_cannot_connect_fails_the_start_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Rig().settings

    async def partitions(settings: Settings) -> int:
        return 1

    class Unreachable:
        def __init__(self, settings: Settings, *, metrics: object) -> None:
            pass

        async def start(self) -> None:
            raise KafkaUnavailable("timeout")

    monkeypatch.setattr(reconciler_module, "ensure_state_topic", partitions)
    monkeypatch.setattr(reconciler_module, "AIOKafkaProducer", lambda **o: FakeClient(**o))
    monkeypatch.setattr(reconciler_module, "KafkaPublisher", Unreachable)
    reconciler = Reconciler(
        settings,
        luma=StubLuma(),  # type: ignore[arg-type]
        metrics=ReconcilerMetrics(CollectorRegistry()),
    )
    with pytest.raises(KafkaError, match="cannot connect the producer: timeout"):
        await reconciler.start()


async def test_taking_over_and_handing_back_are_logged_with_their_partitions(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.reconcile")
    rig = Rig(partitions=3, ours=())
    failing = [True]

    async def load(settings: Settings, topic: str, partitions: list[int]) -> dict[int, Any]:
        assert settings is rig.settings
        if failing[0]:
            raise KafkaConnectionError()
        return {2: {"a": Tracked("queued", 1.0), "b": Tracked("queued", 1.0)}}

    monkeypatch.setattr(reconciler_module, "load_changelog", load)
    await rig.reconciler.take_over([TopicPartition(LIFECYCLE, 2), TopicPartition(LIFECYCLE, 0)])
    [cannot] = [r for r in caplog.records if r.getMessage().startswith("cannot read")]
    assert cannot.levelno == logging.ERROR
    assert cannot.getMessage() == (
        "cannot read the changelog topic; these partitions wait until it can be read"
    )
    assert cannot.fields == {"partitions": [0, 2], "error": "KafkaConnectionError"}  # type: ignore[attr-defined]
    [taken] = [r for r in caplog.records if r.getMessage() == "partitions taken over"]
    assert taken.fields == {"partitions": [0, 2], "restoring": [0, 2]}  # type: ignore[attr-defined]
    failing[0] = False
    await rig.reconciler.reconcile_once()
    [restored] = [
        r for r in caplog.records if r.getMessage() == "state restored from the changelog"
    ]
    assert restored.fields == {"restored": {"0": 0, "2": 2}}  # type: ignore[attr-defined]
    rig.consumer.assigned = {TopicPartition(LIFECYCLE, 0), TopicPartition(LIFECYCLE, 2)}
    rig.log.state("x", "queued", partition=0)
    await rig.read()
    rig.changelog.fail = True
    await rig.reconciler.release([TopicPartition(LIFECYCLE, 0)])
    [unsaved] = [r for r in caplog.records if "state of revoked" in r.getMessage()]
    assert unsaved.getMessage() == "could not save the state of revoked partitions"
    assert isinstance(unsaved.fields["error"], KafkaConnectionError)  # type: ignore[attr-defined]
    rig.changelog.fail = False
    await rig.reconciler.release([TopicPartition(LIFECYCLE, 2)])
    handed = [r for r in caplog.records if r.getMessage() == "partitions handed back"]
    assert [r.fields for r in handed] == [  # type: ignore[attr-defined]
        {"partitions": [0], "committed": {}},
        {"partitions": [2], "committed": {}},
    ]


async def test_a_refused_key_says_what_to_check(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.errors["g"] = KeyRejected("unauthorized", 403)
    await rig.reconciler.reconcile_once()
    [line] = [r for r in caplog.records if "refused the API key" in r.getMessage()]
    assert line.getMessage() == (
        "Luma's API refused the API key (401/403): check LUMA_BRIDGE_LUMA_API_KEY; "
        "nothing is reconciled until the reconciler restarts with a valid key"
    )
