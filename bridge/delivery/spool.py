"""The local write-ahead spool: records Kafka did not acknowledge in time, kept on disk.

SQLite from the standard library, in WAL mode with `synchronous=FULL`, is the
engine: a committed row has been fsynced, so a callback answered 200 from the
spool survives SIGKILL and power loss. Appends from concurrent requests are
grouped into one transaction (one fsync) while the previous one commits.

Each row carries the arrival number (`seq`) its record got when its callback
arrived, not when it was written: a record whose direct send timed out is
spooled after later arrivals may have been, and still sorts before them. The
`Lanes` send rows in `seq` order and delete each one once Kafka acknowledged it.
A row Kafka refuses for good is moved to the `quarantine` table.

`SPOOL_MAX_BYTES` bounds the disk: live pages of the database plus its WAL. The
WAL is checkpointed often enough and truncated after drains so that a drained
spool is small again. A full disk (`database or disk is full`) fails the write,
which the caller answers 503; the next write simply tries again.

Schema versions: 1 (the first release: `spool` only) and 2 (adds `quarantine`).
A version-1 file opens as it is and is upgraded in place. The `doubtful` table (rows
whose send was unresolved when the last process stopped, which the next one looks up in
Kafka before sending them again) is optional: a release that does not know it ignores
it, so it needs no new version.

All SQLite work runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bridge.delivery.publisher import Record
from bridge.ops.metrics import Metrics

log = logging.getLogger("bridge.delivery.spool")
T = TypeVar("T")

SCHEMA_VERSION = 2
SPOOL_TABLE = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    spooled_at REAL NOT NULL,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers TEXT NOT NULL,
    size INTEGER NOT NULL
)
"""
QUARANTINE_TABLE = """
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    spooled_at REAL NOT NULL,
    quarantined_at REAL NOT NULL,
    reason TEXT NOT NULL,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers TEXT NOT NULL,
    size INTEGER NOT NULL
)
"""
DOUBTFUL_TABLE = """
CREATE TABLE IF NOT EXISTS doubtful (
    seq INTEGER PRIMARY KEY,
    sent_ms INTEGER
)
"""
# SQLite's own bytes per row beyond the payload (row header, cell pointers, index).
ROW_OVERHEAD_BYTES = 64
# A record is written twice before a checkpoint: into the WAL, then into the database.
WAL_FACTOR = 2

Lane = bytes | None


RESERVE_NAME = "spool.reserve"
# Free space a write leaves on the volume at least (file system and WAL overhead).
WRITE_MARGIN_BYTES = 64 * 1024


class SpoolFull(Exception):
    """The spool has reached SPOOL_MAX_BYTES on disk; the caller answers 503."""


class SpoolUnwritable(Exception):
    """SQLite could not write (a full disk, an I/O error); the caller answers 503."""


def record_size(record: Record) -> int:
    """Payload bytes of a record (topic, key, value, headers)."""
    return (
        len(record.topic)
        + len(record.key or b"")
        + len(record.value)
        + sum(len(name) + len(value) for name, value in record.headers)
    )


def lane_of(record: Record) -> Lane:
    """The ordered path a record belongs to: its key, the generation id (dead letters,
    which have none, share one)."""
    return record.key


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """One row of the spool."""

    seq: int
    record: Record
    size: int


@dataclass
class _Append:
    rows: Sequence[tuple[int, Record]]
    estimate: int
    done: asyncio.Future[None]


class Spool:
    """A durable store of records ordered by arrival. `await open()` before use; `close()` after."""

    def __init__(self, directory: Path, *, max_bytes: int, metrics: Metrics) -> None:
        self._path = directory / "spool.sqlite3"
        self._directory = directory
        self._max_bytes = max_bytes
        # Bytes kept free on the volume, and held by a reserve file: what deleting rows
        # needs (their pages go through the WAL) when the disk is full.
        self._reserve = min(1 << 20, max(64 * 1024, max_bytes // 64))
        self._reserve_held = False
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._pending: list[_Append] = []
        self._pending_estimate = 0
        self._writer: asyncio.Task[None] | None = None
        self._records = 0
        self._disk_bytes = 0
        self._quarantined = 0
        self._oldest: float | None = None
        self._next_seq = 1
        self.lanes_at_open: dict[Lane, int] = {}
        #: Rows whose send the last process left unresolved: seq -> the earliest time (ms)
        #: it may have been sent (its spooled time when the process did not know).
        self.doubtful_at_open: dict[int, int] = {}

    @property
    def path(self) -> Path:
        return self._path

    @property
    def records(self) -> int:
        """Records waiting in the spool (committed rows)."""
        return self._records

    @property
    def disk_bytes(self) -> int:
        """Bytes the spool takes on disk: live database pages plus the WAL."""
        return self._disk_bytes

    @property
    def quarantined(self) -> int:
        return self._quarantined

    def has_room(self) -> bool:
        return self._disk_bytes + self._pending_estimate < self._max_bytes

    def next_seqs(self, count: int) -> int:
        """Reserve `count` consecutive arrival numbers; returns the first."""
        first = self._next_seq
        self._next_seq += count
        return first

    async def open(self) -> None:
        """Create, upgrade or reopen the spool; rows a previous process left are kept."""
        await self._run(self._open_sync)
        self._update_gauges()
        if self._records:
            log.warning(
                "spool holds records from a previous run; draining them to Kafka first",
                extra={"fields": {"records": self._records, "disk_bytes": self._disk_bytes}},
            )

    def _open_sync(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit is fsynced, so an answered 200 survives power loss too.
        db.execute("PRAGMA synchronous=FULL")
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        # Checkpoint (and cut the WAL back) often enough that the WAL stays a small share
        # of SPOOL_MAX_BYTES, and of the volume: a checkpoint copies the WAL into the
        # database, which needs that much free space; a WAL as large as the free space
        # could never be checkpointed on a full disk, nor rows deleted.
        volume = self._max_bytes
        with contextlib.suppress(OSError):
            stat = os.statvfs(self._directory)
            volume = min(volume, stat.f_blocks * stat.f_frsize)
        checkpoint_pages = max(16, min(1000, volume // page_size // 16))
        db.execute(f"PRAGMA wal_autocheckpoint={checkpoint_pages}")
        db.execute(f"PRAGMA journal_size_limit={checkpoint_pages * page_size}")
        # Room left free for the WAL to reach its limit and be checkpointed.
        self._write_margin = 2 * checkpoint_pages * page_size + WRITE_MARGIN_BYTES
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self._path} was written by a newer release (schema {version}); run that "
                "release to drain it, or `luma-kafka-bridge spool drain` of that release"
            )
        db.execute(SPOOL_TABLE)
        db.execute(QUARANTINE_TABLE)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        count, oldest, last = db.execute(
            "SELECT count(*), min(spooled_at), coalesce(max(seq), 0) FROM spool"
        ).fetchone()
        quarantined, last_quarantined = db.execute(
            "SELECT count(*), coalesce(max(seq), 0) FROM quarantine"
        ).fetchone()
        issued = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
        self.lanes_at_open = {
            key: n for key, n in db.execute("SELECT key, count(*) FROM spool GROUP BY key")
        }
        self._db, self._records, self._oldest = db, count, oldest
        self._quarantined = quarantined
        self._next_seq = max(last, last_quarantined, issued[0] if issued else 0) + 1
        self._keep_reserve_sync()
        self._disk_bytes = self._measure_sync()
        self.doubtful_at_open = self._doubtful_sync(db)

    @staticmethod
    def _doubtful_sync(db: sqlite3.Connection) -> dict[int, int]:
        """The rows the last process noted as unresolved (`mark_doubtful`) and still here."""
        db.execute(DOUBTFUL_TABLE)
        return dict(
            db.execute(
                "SELECT seq, coalesce(sent_ms, CAST(spooled_at * 1000 AS INTEGER)) "
                "FROM doubtful JOIN spool USING (seq)"
            )
        )

    def _free_bytes(self) -> int:
        try:
            stat = os.statvfs(self._directory)
        except OSError:
            return 0
        return stat.f_bavail * stat.f_frsize

    def _keep_reserve_sync(self) -> None:
        """Hold the reserve file when there is room for it (again)."""
        reserve = self._directory / RESERVE_NAME
        if reserve.exists():
            self._reserve_held = True
            return
        with contextlib.suppress(OSError):
            stat = os.statvfs(self._directory)
            self._reserve = min(self._reserve, stat.f_blocks * stat.f_frsize // 16)
        try:
            with reserve.open("wb") as out:
                out.truncate(0)
                out.write(b"\0" * self._reserve)
                out.flush()
                os.fsync(out.fileno())
            self._reserve_held = True
        except OSError:
            reserve.unlink(missing_ok=True)

    def _give_up_reserve_sync(self) -> None:
        reserve = self._directory / RESERVE_NAME
        if reserve.exists():
            log.warning(
                "the spool's volume is full; giving up the reserve so that delivered rows "
                "can still be deleted",
                extra={"fields": {"dir": str(self._directory)}},
            )
            reserve.unlink(missing_ok=True)
        self._reserve_held = False

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(self._close_sync, db)
        self._executor.shutdown(wait=True)

    @staticmethod
    def _close_sync(db: sqlite3.Connection) -> None:
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            log.warning("could not checkpoint the spool at close; it is kept as it is")
        db.close()

    async def append(self, rows: Sequence[tuple[int, Record]]) -> None:
        """Store `rows` (arrival number, record) durably, fsynced.

        Raises `SpoolFull` when they would take the spool past SPOOL_MAX_BYTES on disk,
        `SpoolUnwritable` when SQLite cannot write them (a full disk).
        """
        estimate = sum(WAL_FACTOR * (record_size(r) + ROW_OVERHEAD_BYTES) for _, r in rows)
        if self._disk_bytes + self._pending_estimate + estimate > self._max_bytes:
            raise SpoolFull
        # With the reserve given up (the disk was full), wait until there is room for it.
        margin = self._write_margin + (0 if self._reserve_held else self._reserve)
        if self._free_bytes() < self._pending_estimate + estimate + margin:
            self._metrics.spool_write_errors.inc()
            raise SpoolUnwritable(f"less than {self._reserve} bytes free on {self._directory}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Append(rows, estimate, done))
        self._pending_estimate += estimate
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await asyncio.shield(done)

    async def _write_pending(self) -> None:
        # Whatever arrives while one transaction commits goes into the next one.
        while self._pending:
            batch, self._pending = self._pending, []
            estimate = sum(item.estimate for item in batch)
            try:
                self._disk_bytes = await self._run(self._insert_sync, batch, time.time())
            except Exception as exc:
                self._pending_estimate -= estimate
                error = _unwritable(exc)
                self._metrics.spool_write_errors.inc()
                log.error(
                    "the spool cannot be written; answering 503 until it can "
                    "(check the free space and health of SPOOL_DIR's volume)",
                    extra={"fields": {"error": str(exc), "dir": str(self._directory)}},
                )
                for item in batch:
                    item.done.set_exception(error)
                continue
            self._pending_estimate -= estimate
            written = sum(len(item.rows) for item in batch)
            self._records += written
            self._metrics.spooled.inc(written)
            self._update_gauges()
            for item in batch:
                item.done.set_result(None)

    def _insert_sync(self, batch: list[_Append], spooled_at: float) -> int:
        db = self._require_db()
        rows = [
            (seq, spooled_at, r.topic, r.key, r.value, _encode_headers(r.headers), record_size(r))
            for item in batch
            for seq, r in item.rows
        ]
        try:
            with db:  # one transaction, one fsync
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO spool (seq, spooled_at, topic, key, value, headers, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        except sqlite3.Error:
            # A failed commit may leave a grown WAL behind: give the space back.
            self._checkpoint_sync()
            raise
        if self._oldest is None:
            self._oldest = spooled_at
        return self._measure_sync()

    async def oldest(self, after: int = 0, limit: int = 500) -> list[SpooledRecord]:
        """Up to `limit` rows with a `seq` above `after`, in arrival order."""
        return await self._run(self._oldest_sync, after, limit)

    def _oldest_sync(self, after: int, limit: int) -> list[SpooledRecord]:
        rows = (
            self._require_db()
            .execute(
                "SELECT seq, topic, key, value, headers, size FROM spool WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, limit),
            )
            .fetchall()
        )
        return [
            SpooledRecord(seq, Record(topic, key, value, _decode_headers(headers)), size)
            for seq, topic, key, value, headers, size in rows
        ]

    async def index(self, after: int = 0, limit: int = 500) -> list[tuple[int, Lane, int]]:
        """Up to `limit` (seq, lane, size) with a `seq` above `after`, in arrival order.

        Cheap: no value is read or decoded; `rows()` fetches the ones chosen.
        """
        return await self._run(self._index_sync, after, limit)

    def _index_sync(self, after: int, limit: int) -> list[tuple[int, Lane, int]]:
        rows = self._require_db().execute(
            "SELECT seq, topic, key, size FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [(seq, key, size) for seq, _, key, size in rows]

    async def rows(self, seqs: Sequence[int]) -> list[SpooledRecord]:
        """The rows `seqs` (those still spooled), in arrival order."""
        return await self._run(self._rows_sync, list(seqs))

    def _rows_sync(self, seqs: list[int]) -> list[SpooledRecord]:
        db = self._require_db()
        found: list[SpooledRecord] = []
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.extend(
                SpooledRecord(seq, Record(topic, key, value, _decode_headers(headers)), size)
                for seq, topic, key, value, headers, size in db.execute(
                    f"SELECT seq, topic, key, value, headers, size FROM spool "  # noqa: S608 - only placeholders
                    f"WHERE seq IN ({marks})",
                    chunk,
                )
            )
        return sorted(found, key=lambda row: row.seq)

    async def mark_doubtful(self, sent: dict[int, int | None]) -> None:
        """Remember, for the next process, the rows whose send is unresolved now (seq ->
        when it was sent, in ms, if known): they may be in Kafka already, and are looked up
        before they are sent again. Replaces what was marked before. Raises
        `SpoolUnwritable`."""
        try:
            await self._run(self._mark_doubtful_sync, sent)
        except Exception as exc:
            self._metrics.spool_write_errors.inc()
            raise _unwritable(exc) from exc

    def _mark_doubtful_sync(self, sent: dict[int, int | None]) -> None:
        db = self._require_db()
        with db:  # one transaction, one fsync
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM doubtful")
            db.executemany("INSERT INTO doubtful (seq, sent_ms) VALUES (?, ?)", sent.items())

    async def remove(self, seqs: Iterable[int]) -> None:
        """Delete the rows `seqs` (acknowledged by Kafka). Raises `SpoolUnwritable`."""
        batch = list(seqs)
        if not batch:
            return
        try:
            removed, self._oldest, self._disk_bytes = await self._run(self._remove_sync, batch)
        except Exception as exc:
            self._metrics.spool_write_errors.inc()
            raise _unwritable(exc) from exc
        self._records -= removed
        self._metrics.spool_drained.inc(removed)
        self._update_gauges()

    def _remove_sync(self, seqs: list[int]) -> tuple[int, float | None, int]:
        db = self._require_db()
        try:
            removed = self._delete_sync(seqs)
        except sqlite3.Error as exc:
            if not _disk_full(exc):
                raise
            # Deleting needs WAL space too: give up the reserve, fold the WAL into the
            # database, and try once more.
            self._give_up_reserve_sync()
            self._checkpoint_sync()
            removed = self._delete_sync(seqs)
        oldest, left = db.execute("SELECT min(spooled_at), count(*) FROM spool").fetchone()
        if not left:
            # Drained: cut the WAL back so that an empty spool is small on disk again.
            self._checkpoint_sync()
            self._keep_reserve_sync()
        return removed, oldest, self._measure_sync()

    def _delete_sync(self, seqs: list[int]) -> int:
        db = self._require_db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            return sum(
                db.execute("DELETE FROM spool WHERE seq = ?", (seq,)).rowcount for seq in seqs
            )

    async def quarantine(self, seq: int, reason: str) -> None:
        """Move row `seq` aside: Kafka refuses it for good (`reason`, an error class name)."""
        moved, self._oldest, self._disk_bytes = await self._run(self._quarantine_sync, seq, reason)
        if moved:
            self._records -= 1
            self._quarantined += 1
            self._metrics.spool_quarantined.labels(reason=reason).inc()
            self._update_gauges()

    def _quarantine_sync(self, seq: int, reason: str) -> tuple[int, float | None, int]:
        db = self._require_db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO quarantine (seq, spooled_at, quarantined_at, reason, "
                "topic, key, value, headers, size) SELECT seq, spooled_at, ?, ?, topic, key, "
                "value, headers, size FROM spool WHERE seq = ?",
                (time.time(), reason, seq),
            )
            moved = db.execute("DELETE FROM spool WHERE seq = ?", (seq,)).rowcount
        oldest = db.execute("SELECT min(spooled_at) FROM spool").fetchone()[0]
        return moved, oldest, self._measure_sync()

    async def describe(self) -> dict[str, Any]:
        """What the spool holds, for `spool inspect`."""
        return await self._run(self._describe_sync)

    def _describe_sync(self) -> dict[str, Any]:
        db = self._require_db()
        topics = {
            topic: {"records": n, "bytes": size}
            for topic, n, size in db.execute(
                "SELECT topic, count(*), sum(size) FROM spool GROUP BY topic ORDER BY topic"
            )
        }
        quarantine = [
            {"seq": seq, "topic": topic, "reason": reason, "bytes": size}
            for seq, topic, reason, size in db.execute(
                "SELECT seq, topic, reason, size FROM quarantine ORDER BY seq LIMIT 100"
            )
        ]
        return {
            "path": str(self._path),
            "schema_version": SCHEMA_VERSION,
            "records": self._records,
            "disk_bytes": self._disk_bytes,
            "oldest_age_seconds": round(self.oldest_age(), 3),
            "topics": topics,
            "quarantined": self._quarantined,
            "quarantine": quarantine,
        }

    def _checkpoint_sync(self) -> None:
        # A busy or full disk: the next drain tries again.
        with contextlib.suppress(sqlite3.Error):
            self._require_db().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _measure_sync(self) -> int:
        db = self._require_db()
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        extra = 0
        for name in (f"{self._path.name}-wal", RESERVE_NAME):
            with contextlib.suppress(OSError):
                extra += (self._directory / name).stat().st_size
        return int((pages - free) * page_size + extra)

    def _update_gauges(self) -> None:
        self._metrics.spool_records.set(self._records)
        self._metrics.spool_bytes.set(self._disk_bytes)
        self._metrics.spool_quarantine_records.set(self._quarantined)

    def oldest_age(self) -> float:
        """Seconds the oldest record has waited (0 when empty); read at scrape time."""
        return max(0.0, time.time() - self._oldest) if self._oldest and self._records else 0.0

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the spool is not open")
        return self._db

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


def _disk_full(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)


def _unwritable(exc: BaseException) -> SpoolUnwritable:
    return exc if isinstance(exc, SpoolUnwritable) else SpoolUnwritable(str(exc))


def _encode_headers(headers: list[tuple[str, bytes]]) -> str:
    # Our header values are UTF-8 text we made ourselves; JSON keeps the row readable.
    return json.dumps([[name, value.decode()] for name, value in headers])


def _decode_headers(text: str) -> list[tuple[str, bytes]]:
    return [(name, value.encode()) for name, value in json.loads(text)]
