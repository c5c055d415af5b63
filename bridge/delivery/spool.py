"""The local write-ahead spool: callbacks Kafka did not acknowledge in time, kept on disk.

SQLite from the standard library, in WAL mode with `synchronous=FULL`, is the
engine: a committed row has been fsynced, so a callback answered 200 from the
spool survives SIGKILL and power loss. Appends from concurrent requests are
grouped into one transaction (one fsync) while the previous one commits. A
`SpoolDrainer` sends the rows to Kafka in arrival order and deletes them only
after Kafka has acknowledged them.

All SQLite work runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bridge.delivery.publisher import KafkaUnavailable, Publisher, Record
from bridge.ops.metrics import Metrics
from bridge.ops.tracing import TRACING_OFF, Tracing

log = logging.getLogger("bridge.delivery.spool")
T = TypeVar("T")

SCHEMA = """
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


class SpoolFull(Exception):
    """The spool has reached SPOOL_MAX_BYTES; the caller answers 503."""


def record_size(record: Record) -> int:
    """Bytes a record counts against SPOOL_MAX_BYTES."""
    return (
        len(record.topic)
        + len(record.key or b"")
        + len(record.value)
        + sum(len(name) + len(value) for name, value in record.headers)
    )


@dataclass
class _Append:
    records: Sequence[Record]
    size: int
    done: asyncio.Future[None]


@dataclass(frozen=True)
class SpooledBatch:
    """The oldest rows of the spool, in arrival order."""

    last_seq: int
    records: list[Record]
    size: int


class Spool:
    """A durable FIFO of Kafka records. `await open()` before use; `close()` after."""

    def __init__(self, directory: Path, *, max_bytes: int, metrics: Metrics) -> None:
        self._path = directory / "spool.sqlite3"
        self._directory = directory
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._pending: list[_Append] = []
        self._pending_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._records = 0
        self._bytes = 0
        self._oldest: float | None = None
        self.wakeup = asyncio.Event()

    @property
    def records(self) -> int:
        return self._records

    @property
    def size(self) -> int:
        return self._bytes

    def has_backlog(self) -> bool:
        """Records wait (or are being written): new ones must queue behind to keep order."""
        return self._records > 0 or bool(self._pending)

    def has_room(self) -> bool:
        return self._bytes + self._pending_bytes < self._max_bytes

    async def open(self) -> None:
        """Create or reopen the spool; what a previous process left is kept, to be drained."""
        await self._run(self._open_sync)
        self._update_gauges()
        if self._records:
            log.warning(
                "spool holds records from a previous run; draining them to Kafka first",
                extra={"fields": {"records": self._records, "bytes": self._bytes}},
            )
            self.wakeup.set()

    def _open_sync(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit is fsynced, so an answered 200 survives power loss too.
        db.execute("PRAGMA synchronous=FULL")
        db.execute(SCHEMA)
        count, size, oldest = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), min(spooled_at) FROM spool"
        ).fetchone()
        self._db, self._records, self._bytes, self._oldest = db, count, size, oldest

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)
        self._executor.shutdown(wait=True)

    async def append(self, records: Sequence[Record]) -> None:
        """Store `records` durably (fsynced) or raise `SpoolFull`."""
        size = sum(record_size(record) for record in records)
        if self._bytes + self._pending_bytes + size > self._max_bytes:
            raise SpoolFull
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Append(records, size, done))
        self._pending_bytes += size
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await asyncio.shield(done)

    async def _write_pending(self) -> None:
        # Whatever arrives while one transaction commits goes into the next one.
        while self._pending:
            batch, self._pending = self._pending, []
            batch_bytes = sum(item.size for item in batch)
            try:
                await self._run(self._insert_sync, batch, time.time())
            except Exception as exc:
                self._pending_bytes -= batch_bytes
                for item in batch:
                    item.done.set_exception(exc)
                continue
            self._pending_bytes -= batch_bytes
            self._records += sum(len(item.records) for item in batch)
            self._bytes += batch_bytes
            self._metrics.spooled.inc(len(batch))
            self._update_gauges()
            for item in batch:
                item.done.set_result(None)
            self.wakeup.set()

    def _insert_sync(self, batch: list[_Append], spooled_at: float) -> None:
        db = self._require_db()
        rows = [
            (spooled_at, r.topic, r.key, r.value, _encode_headers(r.headers), record_size(r))
            for item in batch
            for r in item.records
        ]
        with db:  # one transaction, one fsync
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO spool (spooled_at, topic, key, value, headers, size) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        if self._oldest is None:
            self._oldest = spooled_at

    async def oldest(self, limit: int) -> SpooledBatch | None:
        """Up to `limit` of the oldest records, or None when the spool is empty."""
        return await self._run(self._oldest_sync, limit)

    def _oldest_sync(self, limit: int) -> SpooledBatch | None:
        rows = (
            self._require_db()
            .execute(
                "SELECT seq, topic, key, value, headers, size FROM spool ORDER BY seq LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        if not rows:
            return None
        records = [
            Record(topic, key, value, _decode_headers(headers))
            for _, topic, key, value, headers, _ in rows
        ]
        return SpooledBatch(rows[-1][0], records, sum(row[5] for row in rows))

    async def remove_through(self, batch: SpooledBatch) -> None:
        """Delete the rows of `batch` (acknowledged by Kafka)."""
        self._oldest = await self._run(self._remove_sync, batch.last_seq)
        self._records -= len(batch.records)
        self._bytes -= batch.size
        self._metrics.spool_drained.inc(len(batch.records))
        self._update_gauges()

    def _remove_sync(self, last_seq: int) -> float | None:
        db = self._require_db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM spool WHERE seq <= ?", (last_seq,))
        oldest: float | None = db.execute("SELECT min(spooled_at) FROM spool").fetchone()[0]
        return oldest

    def _update_gauges(self) -> None:
        self._metrics.spool_records.set(self._records)
        self._metrics.spool_bytes.set(self._bytes)

    def oldest_age(self) -> float:
        """Seconds the oldest record has waited (0 when empty); read at scrape time."""
        return max(0.0, time.time() - self._oldest) if self._oldest and self._records else 0.0

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the spool is not open")
        return self._db

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


def _encode_headers(headers: list[tuple[str, bytes]]) -> str:
    # Our header values are UTF-8 text we made ourselves; JSON keeps the row readable.
    return json.dumps([[name, value.decode()] for name, value in headers])


def _decode_headers(text: str) -> list[tuple[str, bytes]]:
    return [(name, value.encode()) for name, value in json.loads(text)]


class SpoolDrainer:
    """Sends spooled records to Kafka in arrival order, deleting each batch once acknowledged."""

    BATCH = 500
    ACK_TIMEOUT = 10.0
    MAX_BACKOFF = 5.0

    def __init__(
        self, spool: Spool, publisher: Publisher, *, tracing: Tracing = TRACING_OFF
    ) -> None:
        self._spool = spool
        self._publisher = publisher
        self._tracing = tracing

    async def run(self) -> None:
        """Drain forever; wakes when records are spooled. Cancel to stop."""
        backoff = 0.2
        while True:
            await self._spool.wakeup.wait()
            if await self.drain_once():
                backoff = 0.2
                continue
            if self._spool.records:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.MAX_BACKOFF)
            else:
                self._spool.wakeup.clear()

    async def drain_once(self, ack_timeout: float = ACK_TIMEOUT) -> bool:
        """Send the oldest batch; True if it was acknowledged and removed."""
        batch = await self._spool.oldest(self.BATCH)
        if batch is None:
            return False
        try:
            with self._tracing.drain_span(batch.records):
                await self._publisher.publish(batch.records, ack_timeout)
        except KafkaUnavailable as exc:
            log.debug("spool drain waiting for Kafka", extra={"fields": {"reason": exc.reason}})
            return False
        await self._spool.remove_through(batch)
        if not self._spool.records:
            log.info("spool drained")
        return True

    async def drain_until(self, deadline: float) -> None:
        """At shutdown: drain what Kafka takes before `deadline` (monotonic seconds)."""
        while self._spool.records and (left := deadline - time.monotonic()) > 0:
            if not await self.drain_once(min(left, self.ACK_TIMEOUT)):
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
