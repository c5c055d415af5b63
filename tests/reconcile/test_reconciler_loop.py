"""The reconciler's running loop in process, on the stand-ins of `test_reconciler_decisions.py`:
how `run` paces its passes and reads, when a partition counts as read to its end
(`_caught_up`), what a pass does with each tracked generation (`_act`, `_candidate`,
`_look_up`, `_wrote`), discovery (`_discover`), stopping and the gauges.

The loop's pacing is checked on a simulated monotonic clock (`Clock`): an empty poll takes
its whole timeout on it and a sleep advances it, so the tests see when passes and
checkpoints happen without waiting for them, and without depending on the machine's load.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

import bridge.reconcile.reconciler as reconciler_module
from bridge.contract.callback import encode_compact
from bridge.delivery.publisher import KafkaPublisher
from bridge.reconcile.luma import LumaAPIError
from bridge.reconcile.reconciler import PAGE_OVERLAP, PAGE_SIZE, Reconciler, ReconcilerError
from bridge.reconcile.tracking import Tracked
from tests.reconcile.test_reconciler_decisions import (
    LIFECYCLE,
    NOW,
    PUBLIC_URL,
    FakeConsumer,
    Log,
    Rig,
    generation,
    stuck,
)

REAL_SLEEP = asyncio.sleep


class Clock:
    """`time.monotonic` for the reconciler, kept in whole milliseconds so sums are exact."""

    def __init__(self) -> None:
        self.ms = 1_000_000

    def monotonic(self) -> float:
        return self.ms / 1000

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)

    def since(self, start: float) -> float:
        return round(self.monotonic() - start, 3)


class PacedConsumer(FakeConsumer):
    """A consumer whose empty polls take their whole timeout on `clock` (a poll with records
    returns at once), and which sets `stopping` once the clock reaches `until` (or after
    10 000 polls, should the loop poll without a timeout)."""

    def __init__(self, log: Log, partitions: tuple[int, ...], clock: Clock) -> None:
        super().__init__(log, partitions)
        self.clock = clock
        self.polls: list[tuple[tuple[TopicPartition, ...], int, int | None]] = []
        self.commit_times: list[float] = []
        self.failing_reads = 0
        self.stopping: asyncio.Event | None = None
        self.until = float("inf")

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        self.polls.append((tps, timeout_ms, max_records))
        await REAL_SLEEP(0)
        if self.failing_reads:
            self.failing_reads -= 1
            raise KafkaConnectionError()
        batch = self.take(tps)
        if not batch:
            self.clock.advance(timeout_ms / 1000)
        if self.stopping is not None and (
            self.clock.monotonic() >= self.until or len(self.polls) > 10_000
        ):
            self.stopping.set()
        return batch

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await super().commit(offsets)
        self.commit_times.append(self.clock.monotonic())


class Paced:
    """A `Rig` whose reconciler runs on a simulated monotonic clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> None:
        self.clock = Clock()
        monkeypatch.setattr(
            reconciler_module, "time", SimpleNamespace(monotonic=self.clock.monotonic)
        )
        self.rig = Rig(**overrides)
        self.start = self.clock.monotonic()
        self.consumer = PacedConsumer(self.rig.log, (0,), self.clock)
        self.rig.consumer = self.consumer
        self.rig.reconciler._consumer = self.consumer
        self.pass_times: list[float] = []
        original = self.rig.reconciler.reconcile_once

        async def timed_pass(stopping: asyncio.Event | None = None) -> None:
            self.pass_times.append(self.clock.since(self.start))
            await original(stopping)

        self.rig.reconciler.reconcile_once = timed_pass  # type: ignore[method-assign]

    async def run_for(self, seconds: float) -> None:
        """Run the loop until the clock has moved `seconds` (a real deadline guards a hang)."""
        stopping = asyncio.Event()
        self.consumer.stopping = stopping
        self.consumer.until = self.start + seconds
        await asyncio.wait_for(self.rig.reconciler.run(stopping), timeout=30)

    def commits(self) -> list[float]:
        return [round(t - self.start, 3) for t in self.consumer.commit_times]


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == text]


# -- run: pacing ------------------------------------------------------------------------------


async def test_the_first_pass_comes_within_a_second_then_one_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paced = Paced(monkeypatch, reconcile_interval_seconds=60.0)
    await paced.run_for(130)
    assert paced.pass_times == [1.0, 61.0, 121.0]


async def test_a_short_interval_also_brings_the_first_pass_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paced = Paced(monkeypatch, reconcile_interval_seconds=0.5)
    await paced.run_for(2)
    assert paced.pass_times == [0.5, 1.0, 1.5, 2.0]


async def test_the_loop_polls_for_half_a_second_and_up_to_ten_thousand_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paced = Paced(monkeypatch)
    await paced.run_for(1)
    assert paced.consumer.polls == [((), 500, 10_000), ((), 500, 10_000)]


async def test_the_heartbeat_moves_with_every_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """`last_tick` is what the reconciler's liveness check reads."""
    paced = Paced(monkeypatch)
    await paced.run_for(3)
    assert paced.clock.since(paced.rig.reconciler.last_tick) == 0.5  # the last poll's start


async def test_the_state_is_checkpointed_every_five_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paced = Paced(monkeypatch)
    paced.rig.log.state("g", "queued", at=NOW - 10)
    await paced.run_for(16)
    assert paced.commits() == [5.0, 10.0, 15.0]
    assert paced.consumer.commits[0] == {TopicPartition(LIFECYCLE, 0): 1}
    assert [key for _, _, key, _ in paced.rig.changelog.sent] == [b"g"]


async def test_a_checkpoint_that_fails_is_logged_and_tried_five_seconds_later(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paced = Paced(monkeypatch)
    paced.rig.log.state("g", "queued", at=NOW - 10)
    original = paced.rig.changelog.send
    calls = 0

    async def fail_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KafkaConnectionError()
        return await original(*args, **kwargs)

    paced.rig.changelog.send = fail_once  # type: ignore[method-assign]
    await paced.run_for(11)
    [line] = messages(caplog, "could not save the state; retrying")
    assert line.levelno == logging.WARNING
    assert isinstance(line.fields["error"], KafkaConnectionError)  # type: ignore[attr-defined]
    assert paced.commits() == [10.0]


async def test_a_failed_read_is_logged_waited_out_for_a_second_and_read_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paced = Paced(monkeypatch)
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        paced.clock.advance(delay)
        await REAL_SLEEP(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    paced.rig.log.state("g", "queued", at=NOW - 10)
    paced.consumer.failing_reads = 1
    await paced.run_for(2)
    assert sleeps == [1.0]
    [line] = messages(caplog, "reading the lifecycle topic failed; retrying")
    assert line.levelno == logging.WARNING
    assert isinstance(line.fields["error"], KafkaConnectionError)  # type: ignore[attr-defined]
    assert paced.rig.reconciler.tracker.get(0, "g") is not None  # read after the failure
    assert paced.pass_times == [1.0]


async def test_a_failed_pass_is_logged_with_its_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paced = Paced(monkeypatch, reconcile_interval_seconds=1.0)

    async def broken(stopping: asyncio.Event | None = None) -> None:
        paced.pass_times.append(paced.clock.since(paced.start))
        raise KafkaConnectionError()

    paced.rig.reconciler.reconcile_once = broken  # type: ignore[method-assign]
    await paced.run_for(3)
    assert paced.pass_times == [1.0, 2.0, 3.0]
    lines = messages(caplog, "a pass stopped on a Kafka error; next pass")
    assert len(lines) == 3
    assert isinstance(lines[0].fields["error"], KafkaConnectionError)  # type: ignore[attr-defined]


async def test_the_loop_needs_a_started_reconciler() -> None:
    rig = Rig()
    rig.reconciler._consumer = None
    with pytest.raises(ReconcilerError, match=r"^the reconciler is not started$"):
        await rig.reconciler.run(asyncio.Event())


async def test_stopping_during_a_pass_ends_it_before_the_next_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM mid-pass: the loop's `stopping` reaches the pass, which looks nothing else up."""
    paced = Paced(monkeypatch)
    paced.rig.log.state("a", "queued", at=NOW - 4000)
    paced.rig.log.state("b", "queued", at=NOW - 3000)
    stopping = asyncio.Event()
    original = paced.rig.luma.get

    async def get_then_stop(gid: str) -> bytes:
        stopping.set()
        return await original(gid)

    paced.rig.luma.get = get_then_stop  # type: ignore[method-assign]
    await asyncio.wait_for(paced.rig.reconciler.run(stopping), timeout=30)
    assert paced.rig.luma.gets == ["a"]


# -- stop -------------------------------------------------------------------------------------


class StoppableConsumer(FakeConsumer):
    def __init__(self, log: Log, partitions: tuple[int, ...]) -> None:
        super().__init__(log, partitions)
        self.stopped = 0

    async def stop(self) -> None:
        self.stopped += 1


def stoppable(rig: Rig) -> StoppableConsumer:
    consumer = StoppableConsumer(rig.log, (0,))
    rig.consumer = consumer
    rig.reconciler._consumer = consumer
    rig.changelog.stop = _nothing  # type: ignore[attr-defined]
    return consumer


async def _nothing() -> None:
    pass


async def test_stop_saves_the_state_commits_what_was_read_and_leaves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    consumer = stoppable(rig)
    await stuck(rig)
    await rig.reconciler.stop()
    assert [key for _, _, key, _ in rig.changelog.sent] == [b"g"]
    assert consumer.commits == [{TopicPartition(LIFECYCLE, 0): 1}]
    assert consumer.stopped == 1
    assert not messages(caplog, "could not save the state at shutdown")


async def test_stop_says_which_error_kept_it_from_saving_the_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    consumer = stoppable(rig)
    await stuck(rig)
    rig.changelog.fail = True
    await rig.reconciler.stop()
    [line] = messages(caplog, "could not save the state at shutdown")
    assert line.levelno == logging.WARNING
    assert isinstance(line.fields["error"], KafkaConnectionError)  # type: ignore[attr-defined]
    assert consumer.stopped == 1  # left the group all the same


class PassedInPublisher(KafkaPublisher):
    """A Kafka publisher its creator owns (never connected here)."""

    def __init__(self) -> None:
        self.stopped = 0

    async def stop(self, timeout: float | None = None) -> None:
        self.stopped += 1


async def test_a_kafka_publisher_passed_in_is_left_to_its_owner_to_stop() -> None:
    rig = Rig()
    stoppable(rig)
    publisher = PassedInPublisher()
    reconciler = Reconciler(
        rig.settings,
        luma=rig.luma,  # type: ignore[arg-type]
        metrics=rig.metrics,
        publisher=publisher,
    )
    reconciler._consumer = rig.consumer
    reconciler._changelog = rig.changelog
    await reconciler.stop()
    assert publisher.stopped == 0


# -- _caught_up: reading a partition to its end before acting ---------------------------------


class Stalled(PacedConsumer):
    """A consumer whose fetches for the lifecycle partition return nothing while `stalled`."""

    def __init__(self, log: Log, partitions: tuple[int, ...], clock: Clock) -> None:
        super().__init__(log, partitions, clock)
        self.stalled = False
        self.end_offset_requests = 0

    async def end_offsets(self, tps: Any) -> dict[TopicPartition, int]:
        self.end_offset_requests += 1
        return await super().end_offsets(tps)

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        if self.stalled:
            self.polls.append((tps, timeout_ms, max_records))
            self.clock.advance(timeout_ms / 1000)
            return {}
        return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)


def stalled(paced: Paced) -> Stalled:
    consumer = Stalled(paced.rig.log, (0,), paced.clock)
    paced.consumer = consumer
    paced.rig.consumer = consumer
    paced.rig.reconciler._consumer = consumer
    return consumer


async def test_a_partition_not_read_to_its_end_in_fifteen_seconds_waits_for_the_next_pass(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paced = Paced(monkeypatch)
    consumer = stalled(paced)
    rig = paced.rig
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    rig.log.state("other", "queued", at=NOW - 5)  # landed; the fetches bring nothing
    consumer.polls.clear()
    consumer.stalled = True
    started = paced.clock.monotonic()
    await rig.reconciler.reconcile_once()
    # Polls of 200 ms for that partition only, until 15 s have passed.
    assert consumer.polls == [((TopicPartition(LIFECYCLE, 0),), 200, None)] * 76
    assert paced.clock.since(started) == 15.2
    assert rig.publisher.published == []
    assert rig.sample("luma_bridge_reconciler_lookups_total", outcome="error") == 1
    [line] = messages(
        caplog, "could not read a lifecycle partition to its end in time; acting next pass"
    )
    assert line.levelno == logging.WARNING
    assert line.fields == {"partition": 0}  # type: ignore[attr-defined]
    consumer.stalled = False
    await rig.reconciler.reconcile_once()
    assert rig.written() == [("luma.completed", "completed"), (LIFECYCLE, "completed")]


async def test_reading_to_the_end_is_logged_at_debug_with_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridge.reconcile")
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    rig.log.state("other", "queued", at=NOW - 5)
    await rig.reconciler.reconcile_once()
    [line] = messages(caplog, "caught up")
    assert line.levelno == logging.DEBUG
    assert line.fields == {"partition": 0, "end": 2}  # type: ignore[attr-defined]


async def test_after_its_own_write_a_partition_is_not_read_again_in_the_same_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paced = Paced(monkeypatch)
    consumer = stalled(paced)
    rig = paced.rig
    await stuck(rig, "a", at=NOW - 4000)
    await stuck(rig, "b", at=NOW - 3000)
    rig.luma.put(generation("a", "completed"))
    rig.luma.put(generation("b", "failed"))
    rig.log.state("other", "queued", at=NOW - 5)
    consumer.polls.clear()
    await rig.reconciler.reconcile_once()
    assert [r.key for r in rig.publisher.published if r.topic == LIFECYCLE] == [b"a", b"b"]
    assert len(consumer.polls) == 1  # read once, before acting on "a"


async def test_a_partition_handed_back_during_a_lookup_is_neither_read_nor_acted_on() -> None:
    """aiokafka still lists a partition as assigned while its revocation runs."""
    rig = Rig()
    await stuck(rig)
    rig.luma.put(generation("g", "completed"))
    original = rig.luma.get

    async def revoked_meanwhile(gid: str) -> bytes:
        await rig.reconciler.release([TopicPartition(LIFECYCLE, 0)])
        return await original(gid)

    rig.luma.get = revoked_meanwhile  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert rig.sample("luma_bridge_reconciler_lookups_total", outcome="error") == 1
    assert rig.reconciler._known_end == {}  # nothing known of a partition no longer ours


# -- a pass: budget, restores -----------------------------------------------------------------


@pytest.mark.parametrize(("lookup_seconds", "looked_up"), [(15.0, 3), (15.5, 2)])
async def test_a_pass_looks_up_for_at_most_thirty_seconds_then_still_counts(
    monkeypatch: pytest.MonkeyPatch, lookup_seconds: float, looked_up: int
) -> None:
    """With a short interval, a pass starts lookups for 30 s; the rest wait for the next."""
    paced = Paced(monkeypatch, reconcile_interval_seconds=1.0)
    rig = paced.rig
    for n in range(5):
        await stuck(rig, f"g{n}", "dreaming", at=NOW - 4000 + n)
        rig.luma.put(generation(f"g{n}", "dreaming"))
    original = rig.luma.get

    async def slow_get(gid: str) -> bytes:
        paced.clock.advance(lookup_seconds)
        return await original(gid)

    rig.luma.get = slow_get  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    assert rig.luma.gets == [f"g{n}" for n in range(looked_up)]
    assert rig.sample("luma_bridge_reconciler_passes_total") == 1
    assert rig.sample("luma_bridge_reconciler_last_pass_timestamp_seconds") == NOW


async def test_a_pass_reads_again_only_the_changelog_partitions_that_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(partitions=2, ours=(0,))
    loads: list[list[int]] = []

    async def load(settings: Any, topic: str, partitions: list[int]) -> dict[int, Any]:
        loads.append(partitions)
        if len(loads) == 1:
            raise KafkaConnectionError()
        return {}

    monkeypatch.setattr(reconciler_module, "load_changelog", load)
    await rig.reconciler.take_over([TopicPartition(LIFECYCLE, 1)])
    await rig.reconciler.reconcile_once()
    assert loads == [[1], [1]]


# -- _act and _look_up: what is written, and what is said ------------------------------------


async def test_an_api_error_is_logged_in_these_words(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    await stuck(rig)
    rig.luma.errors["g"] = LumaAPIError("server_error", 503)
    await rig.reconciler.reconcile_once()
    assert messages(caplog, "Luma's API did not answer a lookup; retrying next pass")


async def test_an_unknown_state_is_logged_cut_to_forty_characters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await stuck(rig)
    state = "s" * 39 + "!" + "x" * 20
    rig.luma.bodies["g"] = encode_compact({"id": "g", "state": state})
    await rig.reconciler.reconcile_once()
    [line] = messages(
        caplog, "Luma's API reports a state the reconciler does not know; not written"
    )
    assert line.levelno == logging.WARNING
    assert line.fields == {"generation_id": "g", "state": "s" * 39 + "!"}  # type: ignore[attr-defined]
    assert rig.publisher.published == []


async def test_a_state_kafka_holds_that_this_version_does_not_know_is_overtaken() -> None:
    """A changelog entry of a state this version has no rank for (a newer version's): any
    state Luma reports is written, and the gauge counts it as `other` meanwhile."""
    rig = Rig()
    rig.reconciler.tracker.restore(0, {"g": Tracked("pending", NOW - 3600)})
    rig.reconciler._update_gauges()
    gauge = "luma_bridge_reconciler_stuck_generations"
    assert rig.sample(gauge, state="other", age="2h") == 1
    rig.luma.put(generation("g", "dreaming"))
    await rig.reconciler.reconcile_once()
    assert rig.written() == [("luma.dreaming", "dreaming"), (LIFECYCLE, "dreaming")]


async def test_the_stuck_gauge_counts_every_generation_of_a_state_and_age() -> None:
    rig = Rig()
    await stuck(rig, "a", "queued", at=NOW - 1000)
    await stuck(rig, "b", "queued", at=NOW - 1200)
    rig.reconciler._update_gauges()
    assert rig.sample("luma_bridge_reconciler_stuck_generations", state="queued", age="30m") == 2


async def test_a_record_landing_just_before_ours_is_read_before_the_next_action() -> None:
    """Between reading to the end and our write, a callback for another generation landed:
    the end we knew is dropped, so that generation's action reads it first."""
    rig = Rig()
    await stuck(rig, "a", at=NOW - 4000)
    await stuck(rig, "b", at=NOW - 3000)
    rig.luma.put(generation("a", "completed"))
    rig.luma.put(generation("b", "completed"))
    original = rig.publisher.publish
    raced = False

    async def callback_lands_first(records: Any, ack_timeout: float) -> Any:
        nonlocal raced
        if not raced:
            raced = True
            rig.log.state("b", "completed", at=NOW - 1)
        return await original(records, ack_timeout)

    rig.publisher.publish = callback_lands_first  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    assert [r.key for r in rig.publisher.published] == [b"a", b"a"]
    assert rig.reconciler.tracker.get(0, "b") == Tracked("completed", NOW - 1, done=True)


# -- discovery ----------------------------------------------------------------------------------


def listed(rig: Rig, count: int, *, created: float = NOW - 600) -> list[str]:
    """`count` generations of this bridge at Luma, newest first as Luma lists them."""
    gids = [f"gen{n:04}" for n in range(count)]
    for gid in reversed(gids):
        rig.luma.put(generation(gid, "completed", created=created))
    return gids


def discovered(rig: Rig) -> list[bytes]:
    return [r.key for r in rig.publisher.published if r.topic == LIFECYCLE and r.key]


def pages(*offsets: int) -> list[tuple[int, int]]:
    return [(PAGE_SIZE, offset) for offset in offsets]


async def test_discovery_pages_on_by_the_page_size_less_the_overlap() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    gids = listed(rig, 250)
    stopping = asyncio.Event()
    original = rig.luma.list_page

    async def at_most_six_pages(*, limit: int, offset: int) -> bytes:
        if len(rig.luma.pages) >= 6:
            stopping.set()
        return await original(limit=limit, offset=offset)

    rig.luma.list_page = at_most_six_pages  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once(stopping)
    step = PAGE_SIZE - PAGE_OVERLAP
    assert rig.luma.pages == pages(0, step, 2 * step)
    assert sorted(discovered(rig)) == [gid.encode() for gid in gids]


async def test_discovery_believes_has_more_over_a_full_page() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    listed(rig, PAGE_SIZE)  # one full page, and `has_more: false`
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == pages(0)


async def test_discovery_stops_paging_when_the_pass_is_stopped() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    listed(rig, PAGE_SIZE + 10)
    stopping = asyncio.Event()
    original = rig.luma.list_page

    async def stop_meanwhile(*, limit: int, offset: int) -> bytes:
        stopping.set()
        return await original(limit=limit, offset=offset)

    rig.luma.list_page = stop_meanwhile  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once(stopping)
    assert rig.luma.pages == pages(0)
    assert rig.publisher.published == []


async def test_discovery_pages_for_thirty_seconds_then_writes_what_it_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paced = Paced(monkeypatch, reconcile_interval_seconds=1.0, public_url=PUBLIC_URL)
    rig = paced.rig
    gids = listed(rig, 400)
    original = rig.luma.list_page

    async def slow_page(*, limit: int, offset: int) -> bytes:
        paced.clock.advance(15.0)
        return await original(limit=limit, offset=offset)

    rig.luma.list_page = slow_page  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    step = PAGE_SIZE - PAGE_OVERLAP
    assert rig.luma.pages == pages(0, step, 2 * step)  # the third starts at 30 s, not after
    assert sorted(discovered(rig)) == [gid.encode() for gid in gids[: 2 * step + PAGE_SIZE]]


async def test_a_listing_that_fails_later_still_writes_the_pages_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(public_url=PUBLIC_URL)
    gids = listed(rig, PAGE_SIZE + 50)
    original = rig.luma.list_page

    async def second_page_fails(*, limit: int, offset: int) -> bytes:
        page = await original(limit=limit, offset=offset)
        if offset:
            raise LumaAPIError("server_error", 502)
        return page

    rig.luma.list_page = second_page_fails  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    assert sorted(discovered(rig)) == [gid.encode() for gid in gids[:PAGE_SIZE]]
    [line] = messages(caplog, "discovery stopped: Luma's API did not list generations")
    assert line.levelno == logging.WARNING
    assert line.fields == {"reason": "server_error"}  # type: ignore[attr-defined]


async def test_an_empty_page_after_a_full_one_still_writes_the_full_one() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    gids = listed(rig, PAGE_SIZE)
    original = rig.luma.list_page

    async def more_then_nothing(*, limit: int, offset: int) -> bytes:
        if offset:
            rig.luma.pages.append((limit, offset))
            return b'{"generations": [], "has_more": false}'
        page = orjson.loads(await original(limit=limit, offset=offset))
        return encode_compact({**page, "has_more": True})

    rig.luma.list_page = more_then_nothing  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == pages(0, PAGE_SIZE - PAGE_OVERLAP)
    assert sorted(discovered(rig)) == [gid.encode() for gid in gids]


async def test_a_page_whose_generations_are_not_a_list_ends_discovery() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.list_body = b'{"generations": {"id": "g"}, "has_more": true}'
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == pages(0)


async def test_a_generation_created_exactly_at_the_lookback_keeps_discovery_paging() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    oldest = NOW - 86_400
    listed(rig, PAGE_SIZE + 50, created=oldest - 10)
    rig.luma.put(generation("edge", "completed", created=oldest))
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == pages(0, PAGE_SIZE - PAGE_OVERLAP)
    assert discovered(rig) == [b"edge"]


async def test_odd_entries_in_a_listing_are_skipped_and_the_rest_written() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.list_body = encode_compact(
        {
            "generations": [
                generation("numbered", "completed", id=7),
                generation("no-request", "completed", request=None),
                generation("text-request", "completed", request="x"),
                generation("ours", "completed"),
            ],
            "has_more": False,
        }
    )
    await rig.reconciler.reconcile_once()
    assert discovered(rig) == [b"ours"]


class CountingConsumer(FakeConsumer):
    def __init__(self, log: Log, partitions: tuple[int, ...]) -> None:
        super().__init__(log, partitions)
        self.end_offset_requests = 0

    async def end_offsets(self, tps: Any) -> dict[TopicPartition, int]:
        self.end_offset_requests += 1
        return await super().end_offsets(tps)


async def test_discovery_asks_kafka_nothing_about_generations_it_already_follows() -> None:
    rig = Rig(public_url=PUBLIC_URL)
    consumer = CountingConsumer(rig.log, (0,))
    rig.consumer = consumer
    rig.reconciler._consumer = consumer
    rig.log.state("g", "queued", at=NOW - 10)  # recent: not stuck
    await rig.read()
    rig.luma.put(generation("g", "completed"))
    await rig.reconciler.reconcile_once()
    assert rig.luma.pages == pages(0)
    assert rig.publisher.published == []
    assert consumer.end_offset_requests == 0


async def test_a_discovered_generation_whose_first_callback_lands_meanwhile_is_left_alone() -> None:
    """Kafka now follows it (`queued`, though Luma says `completed`): it is the lookups'
    to repair once it has been silent long enough, not discovery's."""
    rig = Rig(public_url=PUBLIC_URL)
    rig.luma.put(generation("g", "completed"))
    original = rig.luma.list_page

    async def listed_then_queued(*, limit: int, offset: int) -> bytes:
        page = await original(limit=limit, offset=offset)
        rig.log.state("g", "queued", at=NOW - 5)
        return page

    rig.luma.list_page = listed_then_queued  # type: ignore[method-assign]
    await rig.reconciler.reconcile_once()
    assert rig.publisher.published == []
    assert rig.reconciler.tracker.get(0, "g") == Tracked("queued", NOW - 5)
