"""The spool's bookkeeping, each piece on its own: the gauges and counters after every
operation, what a reopen finds, the reserve file, reads by range and by seq, and the
errors a caller answers 503 for. Fast tests on a real SQLite file in a temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bridge.delivery import spool as spool_module
from bridge.delivery.publisher import Record
from bridge.delivery.spool import (
    RESERVE_NAME,
    ROW_OVERHEAD_BYTES,
    SCHEMA_VERSION,
    WAL_FACTOR,
    Spool,
    SpoolFull,
    SpoolUnwritable,
    lane_of,
    record_size,
)
from bridge.ops.metrics import Metrics


def record(n: int, size: int = 100, topic: str = "t.queued") -> Record:
    return Record(topic, f"g{n}".encode(), b"x" * size, [("luma-state", b"queued")])


async def open_spool(path: Path, max_bytes: int = 1 << 20) -> tuple[Spool, Metrics]:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(path, max_bytes=max_bytes, metrics=metrics)
    await spool.open()
    return spool, metrics


async def append(spool: Spool, *records: Record) -> list[int]:
    first = spool.next_seqs(len(records))
    seqs = [first + n for n in range(len(records))]
    await spool.append(list(zip(seqs, records, strict=True)))
    return seqs


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_records_size_counts_topic_key_value_and_headers() -> None:
    assert record_size(Record("abc", b"kk", b"vvvv", [("h1", b"x"), ("h", b"yz")])) == 3 + 2 + 4 + 6
    assert record_size(Record("abc", None, b"v", [])) == 4
    assert lane_of(Record("t", b"g", b"v", [])) == b"g"
    assert lane_of(Record("t", None, b"v", [])) is None


async def test_a_reopened_spool_warns_and_reports_what_it_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool, _ = await open_spool(tmp_path)
    await append(spool, record(1), record(2), Record("t.queued", b"g1", b"v", []))
    await spool.quarantine(2, "RecordTooLargeError")
    await spool.close()

    with caplog.at_level(logging.WARNING, logger="bridge.delivery.spool"):
        reopened, metrics = await open_spool(tmp_path)
    warning = next(r for r in caplog.records if "previous run" in r.getMessage())
    assert warning.getMessage() == (
        "spool holds records from a previous run; draining them to Kafka first"
    )
    assert warning.fields == {"records": 2, "disk_bytes": reopened.disk_bytes}  # type: ignore[attr-defined]
    assert reopened.records == 2
    assert reopened.quarantined == 1
    assert reopened.lanes_at_open == {b"g1": 2}
    assert reopened.disk_bytes > 0
    assert sample(metrics, "luma_bridge_spool_records") == 2
    assert sample(metrics, "luma_bridge_spool_bytes") == reopened.disk_bytes
    assert sample(metrics, "luma_bridge_spool_quarantine_records") == 1
    assert reopened.oldest_age() >= 0
    await reopened.close()


async def test_a_new_spool_opens_quietly_with_empty_gauges(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.spool"):
        spool, metrics = await open_spool(tmp_path / "nested" / "dir")
    assert caplog.records == []
    assert spool.records == 0
    assert spool.quarantined == 0
    assert spool.lanes_at_open == {}
    assert spool.next_seqs(2) == 1
    assert spool.next_seqs(1) == 3
    assert spool.path == tmp_path / "nested" / "dir" / "spool.sqlite3"
    assert sample(metrics, "luma_bridge_spool_bytes") == spool.disk_bytes > 0
    assert spool.oldest_age() == 0.0
    await spool.close()


async def test_seqs_never_repeat_after_the_newest_rows_were_deleted_or_quarantined(
    tmp_path: Path,
) -> None:
    spool, _ = await open_spool(tmp_path)
    seqs = await append(spool, record(1), record(2), record(3))
    await spool.remove(seqs[2:])  # deleted: only sqlite_sequence remembers it
    await spool.close()
    reopened, _ = await open_spool(tmp_path)
    assert reopened.next_seqs(1) == 4
    await reopened.close()

    spool, _ = await open_spool(tmp_path)
    await spool.quarantine(2, "RecordTooLargeError")
    await spool.remove([1])
    await spool.close()
    reopened, _ = await open_spool(tmp_path)
    # Rows kept in the quarantine keep their seqs: a later row must sort after them.
    with sqlite3.connect(tmp_path / "spool.sqlite3") as db:
        db.execute("DELETE FROM sqlite_sequence")
        db.execute(
            "INSERT INTO quarantine SELECT 9, 0, 0, 'x', topic, key, value, headers, "
            "size FROM quarantine WHERE seq = 2"
        )
    await reopened.close()
    again, _ = await open_spool(tmp_path)
    assert again.next_seqs(1) == 10
    await again.close()


async def test_a_spool_of_a_newer_release_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "spool.sqlite3") as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    spool = Spool(tmp_path, max_bytes=1 << 20, metrics=Metrics(CollectorRegistry()))
    with pytest.raises(RuntimeError) as raised:
        await spool.open()
    assert str(raised.value) == (
        f"{tmp_path / 'spool.sqlite3'} was written by a newer release (schema 3); run that "
        "release to drain it, or `luma-kafka-bridge spool drain` of that release"
    )


async def test_the_wal_is_bounded_by_the_volume_and_the_bound(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path, max_bytes=1 << 20)
    db = spool._require_db()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = max(16, min(1000, (1 << 20) // page_size // 16))
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == pages
    assert db.execute("PRAGMA journal_size_limit").fetchone()[0] == pages * page_size
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert spool._write_margin == 2 * pages * page_size + 64 * 1024
    await spool.close()

    large, _ = await open_spool(tmp_path / "large", max_bytes=1 << 40)
    db = large._require_db()
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    await large.close()
    small, _ = await open_spool(tmp_path / "small", max_bytes=1 << 10)
    assert small._require_db().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 16
    await small.close()


async def test_the_reserve_file_is_held_and_counted_on_disk(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path, max_bytes=64 << 20)
    reserve = tmp_path / RESERVE_NAME
    assert reserve.stat().st_size == 1 << 20  # max_bytes // 64, at most 1 MiB
    assert spool._reserve_held
    assert spool.disk_bytes >= 1 << 20
    await spool.close()
    small, _ = await open_spool(tmp_path / "small", max_bytes=1 << 20)
    assert (tmp_path / "small" / RESERVE_NAME).stat().st_size == 64 * 1024  # at least 64 KiB
    await small.close()
    middle, _ = await open_spool(tmp_path / "middle", max_bytes=16 << 20)
    assert (tmp_path / "middle" / RESERVE_NAME).stat().st_size == 256 * 1024
    await middle.close()
    huge, _ = await open_spool(tmp_path / "huge", max_bytes=1 << 30)
    assert (tmp_path / "huge" / RESERVE_NAME).stat().st_size == 1 << 20  # at most 1 MiB
    await huge.close()


async def test_an_existing_reserve_is_kept_as_it_is(tmp_path: Path) -> None:
    (tmp_path / RESERVE_NAME).write_bytes(b"\0" * 10)
    spool, _ = await open_spool(tmp_path)
    assert spool._reserve_held
    assert (tmp_path / RESERVE_NAME).stat().st_size == 10
    await spool.close()


async def test_giving_up_the_reserve_deletes_it_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool, _ = await open_spool(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.spool"):
        spool._give_up_reserve_sync()
        spool._give_up_reserve_sync()
    assert not (tmp_path / RESERVE_NAME).exists()
    assert not spool._reserve_held
    assert [r.getMessage() for r in caplog.records] == [
        "the spool's volume is full; giving up the reserve so that delivered rows can still "
        "be deleted"
    ]
    assert caplog.records[0].fields == {"dir": str(tmp_path)}  # type: ignore[attr-defined]
    await spool.close()


async def test_a_full_spool_refuses_at_the_bound_and_counts_nothing_written(
    tmp_path: Path,
) -> None:
    spool, metrics = await open_spool(tmp_path)
    one = WAL_FACTOR * (record_size(record(1, 1000)) + ROW_OVERHEAD_BYTES)
    # Room for exactly one more such record, not two.
    spool._max_bytes = spool.disk_bytes + one
    assert spool.has_room()
    await append(spool, record(1, 1000))
    spool._max_bytes = spool.disk_bytes + one - 1
    with pytest.raises(SpoolFull):
        await append(spool, record(2, 1000))
    spool._max_bytes = spool.disk_bytes
    assert not spool.has_room()
    assert spool.records == 1
    assert sample(metrics, "luma_bridge_spooled_records_total") == 1
    await spool.close()


async def test_too_little_free_space_refuses_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, metrics = await open_spool(tmp_path)
    estimate = WAL_FACTOR * (record_size(record(1)) + ROW_OVERHEAD_BYTES)
    needed = estimate + spool._write_margin
    monkeypatch.setattr(spool, "_free_bytes", lambda: needed)
    await append(spool, record(1))  # exactly enough
    monkeypatch.setattr(spool, "_free_bytes", lambda: needed - 1)
    with pytest.raises(SpoolUnwritable, match=f"less than {spool._reserve} bytes free on"):
        await append(spool, record(2))
    assert sample(metrics, "luma_bridge_spool_write_errors_total") == 1
    # Without the reserve (given up on a full disk) the reserve's room must come back first.
    spool._reserve_held = False
    monkeypatch.setattr(spool, "_free_bytes", lambda: needed + spool._reserve - 1)
    with pytest.raises(SpoolUnwritable):
        await append(spool, record(3))
    monkeypatch.setattr(spool, "_free_bytes", lambda: needed + spool._reserve)
    await append(spool, record(4))
    assert spool.records == 2
    await spool.close()


async def test_free_bytes_are_the_volumes_and_zero_when_it_cannot_be_read(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    assert spool._free_bytes() > 0
    spool._directory = tmp_path / "gone"
    assert spool._free_bytes() == 0
    spool._directory = tmp_path
    await spool.close()


async def test_a_failed_write_fails_every_waiter_and_the_next_write_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spool, metrics = await open_spool(tmp_path)
    insert = spool._insert_sync

    def full_disk(*args: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(spool, "_insert_sync", full_disk)
    with (
        caplog.at_level(logging.ERROR, logger="bridge.delivery.spool"),
        pytest.raises(SpoolUnwritable, match="database or disk is full"),
    ):
        await append(spool, record(1))
    assert "the spool cannot be written" in caplog.text
    logged = next(r for r in caplog.records if "cannot be written" in r.getMessage())
    assert logged.fields == {  # type: ignore[attr-defined]
        "error": "database or disk is full",
        "dir": str(tmp_path),
    }
    assert spool._pending_estimate == 0
    assert spool.records == 0
    assert sample(metrics, "luma_bridge_spool_write_errors_total") == 1
    assert sample(metrics, "luma_bridge_spooled_records_total") == 0
    monkeypatch.setattr(spool, "_insert_sync", insert)
    await append(spool, record(2))
    assert spool.records == 1
    assert sample(metrics, "luma_bridge_spool_records") == 1
    await spool.close()


async def test_reads_by_range_and_by_seq_in_arrival_order(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    seqs = await append(spool, *(record(n, 10) for n in range(1, 8)))
    assert [row.seq for row in await spool.oldest()] == seqs
    first = (await spool.oldest(limit=1))[0]
    assert (first.record, first.size) == (record(1, 10), record_size(record(1, 10)))
    assert [row.seq for row in await spool.oldest(after=seqs[2], limit=2)] == seqs[3:5]
    index = await spool.index(after=seqs[0], limit=3)
    size = record_size(record(1, 10))
    assert index == [(seqs[1], b"g2", size), (seqs[2], b"g3", size), (seqs[3], b"g4", size)]
    assert len(await spool.index()) == 7
    rows = await spool.rows([seqs[4], seqs[1], 999])
    assert [(row.seq, row.record, row.size) for row in rows] == [
        (seqs[1], record(2, 10), size),
        (seqs[4], record(5, 10), size),
    ]
    await spool.close()


async def test_rows_are_fetched_in_chunks_past_sqlites_variable_limit(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    seqs = await append(spool, *(record(n, 1) for n in range(1200)))
    rows = await spool.rows(list(reversed(seqs)))
    assert [row.seq for row in rows] == seqs
    assert len(await spool.oldest(limit=1000)) == 1000
    assert len(await spool.oldest()) == 500
    assert len(await spool.index()) == 500
    await spool.close()


async def test_removing_updates_counts_gauges_and_the_oldest_age(tmp_path: Path) -> None:
    spool, metrics = await open_spool(tmp_path)
    seqs = await append(spool, record(1), record(2))
    spool._oldest = time.time() - 100
    assert 99 < spool.oldest_age() < 200
    await spool.remove([])  # nothing to do
    await spool.remove([seqs[0], 12345])
    assert spool.records == 1
    assert sample(metrics, "luma_bridge_spool_drained_records_total") == 1
    assert sample(metrics, "luma_bridge_spool_records") == 1
    assert sample(metrics, "luma_bridge_spool_bytes") == spool.disk_bytes
    assert spool.oldest_age() < 50  # the oldest left is the second row's time
    await spool.remove([seqs[1]])
    assert spool.records == 0
    assert spool.oldest_age() == 0.0
    assert sample(metrics, "luma_bridge_spool_drained_records_total") == 2
    # Drained: the WAL is cut back.
    assert (tmp_path / "spool.sqlite3-wal").stat().st_size == 0
    await spool.close()


async def test_a_delete_on_a_full_disk_gives_up_the_reserve_and_tries_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, metrics = await open_spool(tmp_path)
    seqs = await append(spool, record(1), record(2))
    delete = spool._delete_sync
    calls = 0

    def full_once(batch: list[int]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return delete(batch)

    monkeypatch.setattr(spool, "_delete_sync", full_once)
    await spool.remove(seqs[:1])
    assert calls == 2
    assert not (tmp_path / RESERVE_NAME).exists()
    assert spool.records == 1
    # Another error is not retried: the caller answers 503.
    monkeypatch.setattr(
        spool, "_delete_sync", lambda batch: (_ for _ in ()).throw(sqlite3.OperationalError("io"))
    )
    with pytest.raises(SpoolUnwritable, match="io"):
        await spool.remove(seqs[1:])
    assert spool.records == 1
    assert sample(metrics, "luma_bridge_spool_write_errors_total") == 1
    monkeypatch.setattr(spool, "_delete_sync", delete)
    await spool.remove(seqs[1:])
    assert spool._reserve_held  # drained: the reserve is taken again
    assert (tmp_path / RESERVE_NAME).exists()
    await spool.close()


async def test_quarantining_a_row_that_is_gone_changes_nothing(tmp_path: Path) -> None:
    spool, metrics = await open_spool(tmp_path)
    seqs = await append(spool, record(1), record(2))
    await spool.quarantine(999, "RecordTooLargeError")
    assert spool.records == 2
    assert spool.quarantined == 0
    await spool.quarantine(seqs[0], "RecordTooLargeError")
    assert spool.records == 1
    assert spool.quarantined == 1
    assert sample(metrics, "luma_bridge_spool_records") == 1
    assert sample(metrics, "luma_bridge_spool_quarantine_records") == 1
    await spool.close()


async def test_describe_says_what_the_spool_holds(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    await append(spool, record(1, 10, "t.b"), record(2, 20, "t.a"), record(3, 30, "t.a"))
    await spool.quarantine(1, "CorruptRecordException")
    described = await spool.describe()
    assert described == {
        "path": str(tmp_path / "spool.sqlite3"),
        "schema_version": SCHEMA_VERSION,
        "records": 2,
        "disk_bytes": spool.disk_bytes,
        "oldest_age_seconds": described["oldest_age_seconds"],
        "topics": {
            "t.a": {
                "records": 2,
                "bytes": record_size(record(2, 20, "t.a")) + record_size(record(3, 30, "t.a")),
            }
        },
        "quarantined": 1,
        "quarantine": [
            {
                "seq": 1,
                "topic": "t.b",
                "reason": "CorruptRecordException",
                "bytes": record_size(record(1, 10, "t.b")),
            }
        ],
    }
    assert 0 <= described["oldest_age_seconds"] < 60
    await spool.close()


async def test_close_checkpoints_the_wal_and_a_closed_spool_refuses_work(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    await append(spool, record(1))
    await spool.close()
    wal = tmp_path / "spool.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    with pytest.raises(RuntimeError) as raised:
        spool._require_db()
    assert str(raised.value) == "the spool is not open"


def test_disk_full_is_recognised_by_code_or_message() -> None:
    assert spool_module._disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not spool_module._disk_full(sqlite3.OperationalError("disk I/O error"))
    unwritable = SpoolUnwritable("x")
    assert spool_module._unwritable(unwritable) is unwritable
    converted = spool_module._unwritable(OSError("boom"))
    assert isinstance(converted, SpoolUnwritable)
    assert str(converted) == "boom"


async def test_room_counts_the_writes_still_pending(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    room = spool._max_bytes - spool.disk_bytes
    spool._pending_estimate = room - 1
    assert spool.has_room()
    spool._pending_estimate = room
    assert not spool.has_room()
    spool._pending_estimate = 0
    await spool.close()


async def test_each_quarantined_row_is_counted_and_the_oldest_left_is_kept(
    tmp_path: Path,
) -> None:
    spool, metrics = await open_spool(tmp_path)
    seqs = await append(spool, record(1), record(2), record(3))
    await spool.quarantine(seqs[0], "RecordTooLargeError")
    await spool.quarantine(seqs[1], "CorruptRecordException")
    assert spool.quarantined == 2
    assert sample(metrics, "luma_bridge_spool_quarantine_records") == 2
    assert spool._oldest is not None  # the third row still waits
    await spool.close()


async def test_the_oldest_age_is_reported_in_seconds_rounded_to_milliseconds(
    tmp_path: Path,
) -> None:
    spool, _ = await open_spool(tmp_path)
    await append(spool, record(1))
    assert 0.0 <= spool.oldest_age() < 1.0  # just written
    spool._oldest = time.time() - 12.3456789
    age = (await spool.describe())["oldest_age_seconds"]
    assert 12.3 < age < 13.3
    assert round(age, 3) == age
    assert age != round(age)
    spool.oldest_age = lambda: 12.34567  # type: ignore[method-assign]
    assert (await spool.describe())["oldest_age_seconds"] == 12.346
    await spool.close()


async def test_no_age_is_reported_while_no_row_is_counted(tmp_path: Path) -> None:
    """An insert sets the oldest time in the spool's thread before its rows are counted."""
    spool, _ = await open_spool(tmp_path)
    spool._oldest = time.time() - 50
    assert spool.oldest_age() == 0.0
    await spool.close()


def test_a_full_disk_is_recognised_by_sqlites_error_code_alone() -> None:
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert spool_module._disk_full(error)


class BusyDatabase:
    """Stands in for a connection whose every statement fails (locked, I/O error)."""

    closed = False

    def execute(self, statement: str) -> None:
        raise sqlite3.OperationalError("database is locked")

    def close(self) -> None:
        self.closed = True


async def test_a_checkpoint_that_fails_is_left_for_the_next_drain(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    db = spool._db
    spool._db = BusyDatabase()  # type: ignore[assignment]
    spool._checkpoint_sync()  # does not raise
    spool._db = db
    await spool.close()


def test_a_spool_that_cannot_be_checkpointed_at_close_is_closed_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = BusyDatabase()
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.spool"):
        Spool._close_sync(db)  # type: ignore[arg-type]
    assert db.closed
    assert [r.getMessage() for r in caplog.records] == [
        "could not checkpoint the spool at close; it is kept as it is"
    ]


async def test_writes_still_pending_count_against_the_bound(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    one = WAL_FACTOR * (record_size(record(1)) + ROW_OVERHEAD_BYTES)
    spool._max_bytes = spool.disk_bytes + 2 * one  # room for two, not three
    outcomes = await asyncio.gather(
        append(spool, record(1)),
        append(spool, record(2)),
        append(spool, record(3)),
        return_exceptions=True,
    )
    assert [type(outcome) for outcome in outcomes] == [list, list, SpoolFull]
    assert spool.records == 2
    await spool.close()


async def test_the_first_write_sets_the_oldest_time_and_later_ones_keep_it(
    tmp_path: Path,
) -> None:
    spool, _ = await open_spool(tmp_path)
    await append(spool, record(1))
    first = spool._oldest
    assert first is not None
    await append(spool, record(2))
    assert spool._oldest == first
    await spool.close()


async def test_close_waits_for_a_write_still_pending(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    writing = asyncio.create_task(append(spool, record(1)))
    await asyncio.sleep(0)  # the append is queued, its transaction not yet committed
    await spool.close()
    await writing
    reopened, _ = await open_spool(tmp_path)
    assert reopened.records == 1
    await reopened.close()


async def test_appends_queued_behind_a_failed_write_are_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, _ = await open_spool(tmp_path)
    insert = spool._insert_sync
    entered, release = threading.Event(), threading.Event()
    calls = 0

    def fail_first(*args: object) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            release.wait(10)
            raise sqlite3.OperationalError("disk I/O error")
        return insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(spool, "_insert_sync", fail_first)
    first = asyncio.create_task(append(spool, record(1)))
    await asyncio.to_thread(entered.wait, 10)
    second = asyncio.create_task(append(spool, record(2)))
    await asyncio.sleep(0)  # queued behind the transaction in progress
    release.set()
    with pytest.raises(SpoolUnwritable):
        await first
    await asyncio.wait_for(second, 10)
    assert spool.records == 1
    await spool.close()


class Volume:
    """What `os.statvfs` says of a small volume: 1 MiB in 4 KiB blocks, half of it free."""

    f_blocks = 256
    f_frsize = 4096
    f_bavail = 128


async def test_on_a_small_volume_the_reserve_is_a_sixteenth_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "statvfs", lambda _: Volume())
    spool, _ = await open_spool(tmp_path, max_bytes=64 << 20)
    assert (tmp_path / RESERVE_NAME).stat().st_size == (1 << 20) // 16
    await spool.close()


async def test_a_volume_that_cannot_be_measured_keeps_the_configured_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unmeasurable(_: object) -> None:
        raise OSError("statvfs not supported")

    monkeypatch.setattr(os, "statvfs", unmeasurable)
    spool, _ = await open_spool(tmp_path, max_bytes=64 << 20)
    assert (tmp_path / RESERVE_NAME).stat().st_size == 1 << 20
    await spool.close()


async def test_disk_bytes_are_the_live_pages_plus_the_wal_and_the_reserve(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    await append(spool, record(1), record(2))
    db = spool._require_db()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    live = (
        db.execute("PRAGMA page_count").fetchone()[0]
        - db.execute("PRAGMA freelist_count").fetchone()[0]
    )
    wal = (tmp_path / "spool.sqlite3-wal").stat().st_size
    reserve = (tmp_path / RESERVE_NAME).stat().st_size
    assert spool.disk_bytes == live * page_size + wal + reserve
    await spool.close()


async def test_a_reserve_that_cannot_be_created_is_not_held_and_the_spool_still_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opener = Path.open

    def no_reserve(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == RESERVE_NAME:
            raise OSError("no space left on device")
        return opener(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_reserve)
    spool, _ = await open_spool(tmp_path)
    assert spool._reserve_held is False
    assert not (tmp_path / RESERVE_NAME).exists()
    await spool.close()
