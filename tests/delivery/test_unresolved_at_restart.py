"""Rows whose send a process left unresolved when it stopped (in the producer, failed without
an answer, acknowledged but not deleted) may be in Kafka already: the spool remembers them,
and the next process looks them up before sending them again, so a restart during an outage
does not write them twice."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import bridge.delivery.lanes as lanes_module
from bridge.delivery.lanes import LOOKUP_CLOCK_MARGIN_MS, Lanes
from bridge.delivery.spool import Spool, SpoolUnwritable
from bridge.ops.metrics import Metrics
from tests.delivery.test_lanes import ScriptedPublisher, rec, states
from tests.delivery.test_lanes_details import spool_rows
from tests.helpers import wait_until

SENT_MS = 1_800_000_000_000


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def spool(tmp_path: Path, metrics: Metrics) -> AsyncIterator[Spool]:
    opened = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def reopened(spool: Spool, metrics: Metrics) -> Spool:
    """The same spool as the next process opens it."""
    await spool.close()
    again = Spool(spool.path.parent, max_bytes=8 << 20, metrics=metrics)
    await again.open()
    return again


async def drain_until(lanes: Lanes, records: int) -> None:
    """Open `lanes` and run its drainer until its spool holds `records` rows."""
    lanes.open()
    spool = lanes._spool
    assert spool is not None
    drainer = asyncio.create_task(lanes.run())
    try:
        await wait_until(lambda: spool.records == records, timeout=10, what="the spool drained")
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)


async def test_the_rows_marked_unresolved_are_what_the_next_open_finds(
    spool: Spool, metrics: Metrics
) -> None:
    before_ms = int(time.time() * 1000)
    await spool_rows(spool, rec("a", "queued"), rec("b", "queued"), rec("c", "queued"))
    after_ms = int(time.time() * 1000)
    await spool.mark_doubtful({1: SENT_MS, 2: None, 3: None})
    await spool.remove([3])  # acknowledged since: nothing to look up
    again = await reopened(spool, metrics)
    try:
        assert again.doubtful_at_open.keys() == {1, 2}
        assert again.doubtful_at_open[1] == SENT_MS
        # The send time unknown: the row's spooled time, which is no later.
        assert before_ms - 1 <= again.doubtful_at_open[2] <= after_ms + 1
        await again.mark_doubtful({2: None})  # replaces what was marked before
        third = await reopened(again, metrics)
        assert third.doubtful_at_open.keys() == {2}
        await third.mark_doubtful({})
        fourth = await reopened(third, metrics)
        assert fourth.doubtful_at_open == {}
        await fourth.close()
    finally:
        await again.close()


async def test_the_next_process_looks_up_unresolved_rows_and_sends_only_what_is_missing(
    spool: Spool, metrics: Metrics
) -> None:
    await spool_rows(spool, rec("a", "queued"), rec("b", "queued"), rec("c", "queued"))
    await spool.mark_doubtful({1: SENT_MS, 2: None})
    again = await reopened(spool, metrics)
    publisher = ScriptedPublisher()
    publisher.landed.append(rec("a", "queued"))  # the last process's send of a landed
    try:
        await drain_until(Lanes(publisher=publisher, spool=again, metrics=metrics), 0)
    finally:
        await again.close()
    assert states(publisher.landed, "a") == ["queued"]  # once
    assert [r.key for r in publisher.sent] == [b"b", b"c"]
    [(looked_up, since_ms)] = publisher.lookups
    assert [r.key for r in looked_up] == [b"a", b"b"]  # c was never sent: no lookup
    assert since_ms <= SENT_MS - LOOKUP_CLOCK_MARGIN_MS
    found = metrics.registry.get_sample_value(
        "luma_bridge_resend_lookups_total", {"outcome": "found"}
    )
    assert found == 1


async def test_a_stop_with_sends_held_in_the_producer_marks_them_and_only_them(
    spool: Spool, metrics: Metrics
) -> None:
    publisher = ScriptedPublisher()
    publisher.verdict = lambda r: "hold" if r.key == b"a" else None
    await spool_rows(spool, rec("a", "queued"), rec("b", "queued"))
    lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics)
    await drain_until(lanes, 1)  # b written, a held
    await lanes.settle(time.monotonic() + 0.3)
    again = await reopened(spool, metrics)
    try:
        assert again.doubtful_at_open.keys() == {1}
    finally:
        await again.close()


async def test_a_failed_send_keeps_its_send_time_across_the_restart(
    spool: Spool, metrics: Metrics
) -> None:
    await spool_rows(spool, rec("a", "queued"))
    lanes = Lanes(publisher=ScriptedPublisher(), spool=spool, metrics=metrics)
    lanes.open()
    lanes._doubtful[1] = SENT_MS  # its send failed without an answer, and was not retried
    await lanes.settle(time.monotonic() + 0.1)
    again = await reopened(spool, metrics)
    try:
        assert again.doubtful_at_open == {1: SENT_MS}
    finally:
        await again.close()


async def test_a_spool_that_cannot_note_the_rows_says_so_and_names_the_error(
    spool: Spool, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(sent: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(spool, "_mark_doubtful_sync", locked)
    with pytest.raises(SpoolUnwritable, match=r"^database is locked$"):
        await spool.mark_doubtful({1: None})
    assert metrics.registry.get_sample_value("luma_bridge_spool_write_errors_total") == 1


@pytest.mark.parametrize("failure", ["unwritable", "slow"])
async def test_a_stop_that_cannot_note_the_rows_warns_that_they_may_be_written_twice(
    spool: Spool,
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    async def unwritable(sent: object) -> None:
        raise SpoolUnwritable("database or disk is full")

    async def slow(sent: object) -> None:
        await asyncio.sleep(30)

    monkeypatch.setattr(spool, "mark_doubtful", unwritable if failure == "unwritable" else slow)
    monkeypatch.setattr(lanes_module, "MARK_SECONDS", 0.05)
    await spool_rows(spool, rec("a", "queued"), rec("b", "queued"))
    lanes = Lanes(publisher=ScriptedPublisher(), spool=spool, metrics=metrics)
    lanes.open()
    lanes._doubtful.update({1: SENT_MS, 2: SENT_MS})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.lanes"):
        await lanes.settle(started)
    assert time.monotonic() - started < 5
    [warning] = [r for r in caplog.records if r.getMessage().startswith("could not note")]
    assert warning.getMessage() == (
        "could not note which spooled rows may be in Kafka already; the next start sends "
        "them again without looking, which may write them twice"
    )
    reason = "SpoolUnwritable" if failure == "unwritable" else "TimeoutError"
    assert warning.fields == {"rows": 2, "reason": reason}  # type: ignore[attr-defined]
