"""One ordered path per generation: the only way records reach Kafka.

A lane is a generation: its records share the key, the generation id. Every record
of an accepted callback belongs to its generation's lane, and a lane has in the
producer at most the records of one callback at any time (the drainer: one record).
So a later callback never overtakes an earlier one, and no copy of an earlier record
can land after a later one (aiokafka keeps a partition's retries in order; a record
is only ever sent again after its previous send ended).

A callback whose lanes are idle is sent at once and answered when Kafka
acknowledges it (the fast path: no disk). If Kafka does not acknowledge within
`KAFKA_ACK_TIMEOUT` (`DEGRADED_ACK_WAIT` while earlier sends are still pending past
theirs), its records are spooled (fsynced) and answered 200; their
sends keep going, and a late acknowledgement deletes the row instead of sending
it again. A callback whose lane is busy (an earlier record still unresolved)
goes straight to the spool, behind it. `run()` sends spooled rows in arrival
order, one per lane at a time, and deletes each one Kafka acknowledged.

A send that failed without Kafka's answer (a timeout, a dropped connection) may still
have been appended: such a row is looked up in Kafka before it is sent again, and
removed if it is there (`Publisher.find`), so an outage does not write it twice.

Errors are sorted by `classify`: retried with backoff; a record refused for good
is quarantined (never blocking its lane) and copied to the dead-letter topic when that
topic takes it; a refused topic or client keeps its rows
and counts as no progress; an unusable producer is renewed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiokafka.errors import ProducerClosed

from bridge.contract.callback import refused_record_letter_headers
from bridge.delivery.publisher import (
    Failure,
    KafkaUnavailable,
    Placement,
    Publisher,
    Record,
    classify,
    failure_reason,
    may_have_landed,
    settle_within,
)
from bridge.delivery.spool import (
    Lane,
    Spool,
    SpooledRecord,
    SpoolFull,
    SpoolUnwritable,
    lane_of,
)
from bridge.ops.metrics import Metrics

log = logging.getLogger("bridge.delivery.lanes")

MIN_BACKOFF = 0.2
ROUND_PAUSE = 0.005
# How long a callback waits for Kafka while earlier sends are still pending past their
# ack timeout (Kafka away or slow), before it is spooled.
DEGRADED_ACK_WAIT = 0.25
MAX_BACKOFF = 5.0
# Looking a doubtful row up in Kafka: how long it may take, and how far before the failed
# send the search starts (record timestamps come from the producer's clock, or from the
# broker's with LogAppendTime).
LOOKUP_SECONDS = 5.0
LOOKUP_CLOCK_MARGIN_MS = 10_000
# At shutdown, for noting the rows whose send is unresolved (one small SQLite write).
MARK_SECONDS = 1.0


class Unavailable(Exception):
    """Not acknowledged and not spooled: the caller answers 503 (Luma retries)."""

    def __init__(self, reason: str, *, spool_full: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.spool_full = spool_full


class Refused(Exception):
    """Kafka refuses these records for good (too large, invalid): retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Written:
    """Where the records went: Kafka's placements, or the spool."""

    placements: tuple[Placement, ...]
    spooled: bool


class Lanes:
    """Writes records in arrival order per lane, through the producer and the spool."""

    WINDOW_RECORDS = 1000
    WINDOW_BYTES = 4 * 1024 * 1024
    SCAN_ROWS = 4000

    def __init__(
        self,
        *,
        publisher: Publisher,
        spool: Spool | None,
        metrics: Metrics,
        stall_seconds: float = 60.0,
        dead_letter_topic: str | None = None,
    ) -> None:
        self._publisher = publisher
        self._dead_letter_topic = dead_letter_topic
        self._spool = spool
        self._metrics = metrics
        self._stall_seconds = stall_seconds
        self._held: dict[Lane, int] = {}  # records not yet resolved, per lane
        self._direct: dict[Lane, int] = {}  # sends of not-yet-spooled records, per lane
        self._pinned: dict[int, Lane] = {}  # spooled rows whose direct send is still pending
        self._sending: dict[int, Lane] = {}  # spooled rows being sent by `run()`
        self._sending_bytes = 0
        self._acked: dict[int, Lane] = {}  # acknowledged rows not yet deleted
        # Rows whose send failed without an answer: epoch ms of their earliest such send.
        self._doubtful: dict[int, int] = {}
        self._finished: list[tuple[SpooledRecord, int, asyncio.Future[Placement]]] = []
        self._free: dict[Lane, list[asyncio.Future[None]]] = {}
        self._retry_at = 0.0
        self._backoff = MIN_BACKOFF
        self._renew = False
        self._last_progress = time.monotonic()
        self._last_refusal = ""
        self._scan = False  # something may have become sendable: read the spool again
        self.wakeup = asyncio.Event()
        self.changed = asyncio.Event()

    def open(self) -> None:
        """Take the lanes of rows a previous process left in the spool, and look up in
        Kafka, before sending them again, those whose send it left unresolved."""
        if self._spool is not None:
            for lane, count in self._spool.lanes_at_open.items():
                self._held[lane] = self._held.get(lane, 0) + count
            self._unblocked()
            self._doubtful.update(self._spool.doubtful_at_open)

    # The path of a callback ------------------------------------------------------

    async def write(self, records: Sequence[Record], ack_timeout: float) -> Written:
        """Write `records` (one callback's) behind every earlier record of their lanes.

        Returns once Kafka acknowledged them, or once they are fsynced in the spool.
        Raises `Unavailable` (neither, in time) or `Refused` (Kafka refuses them for good).
        """
        loop = asyncio.get_running_loop()
        if self._pinned:
            # Sends older than the ack timeout are still pending: Kafka is away or slow
            # now, so spool soon instead of making Luma wait the whole timeout.
            ack_timeout = min(ack_timeout, DEGRADED_ACK_WAIT)
        deadline = loop.time() + ack_timeout
        lanes = [lane_of(record) for record in records]
        first = self._spool.next_seqs(len(records)) if self._spool is not None else 0
        rows = [(first + n, record) for n, record in enumerate(records)]
        if any(lane in self._held for lane in lanes):
            if self._spool is not None:
                return await self._spool_behind(rows, lanes)
            await self._wait_free(lanes, deadline)
        self._hold(lanes)
        for lane in lanes:
            self._direct[lane] = self._direct.get(lane, 0) + 1
        try:
            return await self._send_direct(rows, lanes, deadline)
        finally:
            for lane in lanes:
                self._direct[lane] -= 1
                if not self._direct[lane]:
                    del self._direct[lane]
                    if lane in self._held:
                        self._unblocked()  # rows wait behind this send

    async def _spool_behind(self, rows: list[tuple[int, Record]], lanes: list[Lane]) -> Written:
        assert self._spool is not None
        self._hold(lanes)
        try:
            await self._spool.append(rows)
        except BaseException as exc:
            for lane in lanes:
                self._release(lane)
            raise _unavailable(exc) from exc
        # A row behind a busy lane waits for that lane to move, which wakes the drainer; but
        # if it moved while the row was written, that round did not see the row yet.
        if not self._busy_lanes().issuperset(lanes):
            self._unblocked()
        return Written((), spooled=True)

    async def _send_direct(
        self, rows: list[tuple[int, Record]], lanes: list[Lane], deadline: float
    ) -> Written:
        sent_ms = _now_ms()
        futures = self._publisher.send([record for _, record in rows])
        await settle_within(futures, deadline - asyncio.get_running_loop().time())
        if all(_succeeded(future) for future in futures):
            for lane in lanes:
                self._release(lane)
            return Written(tuple(future.result() for future in futures), spooled=False)
        errors = [
            future.exception() for future in futures if future.done() and not future.cancelled()
        ]
        failures = {classify(error): error for error in errors if error is not None}
        if Failure.PRODUCER in failures:
            self._renew = True
        refused = failures.get(Failure.RECORD)
        if refused is not None:
            self._release_when_done(futures, lanes)
            self._metrics.refused.labels(reason=failure_reason(refused)).inc()
            raise Refused(failure_reason(refused))
        unacked = [
            (row, lane, future)
            for row, lane, future in zip(rows, lanes, futures, strict=True)
            if not _succeeded(future)
        ]
        for _, lane, future in zip(rows, lanes, futures, strict=True):
            if _succeeded(future):
                self._release(lane)
        reason = _reason(futures)
        if reason == "timeout":
            self._metrics.produce_errors.labels(reason="timeout").inc()
        if self._spool is None:
            self._release_when_done([f for _, _, f in unacked], [lane for _, lane, _ in unacked])
            raise Unavailable(f"Kafka unavailable: {reason}")
        try:
            await self._spool.append([row for row, _, _ in unacked])
        except BaseException as exc:
            self._release_when_done([f for _, _, f in unacked], [lane for _, lane, _ in unacked])
            raise _unavailable(exc) from exc
        for (seq, _), lane, future in unacked:
            self._pin(seq, lane, sent_ms, future)
        if any(future.done() for _, _, future in unacked):
            self._unblocked()  # failed already: the drainer sends those rows
        return Written((), spooled=True)

    def _pin(self, seq: int, lane: Lane, sent_ms: int, future: asyncio.Future[Placement]) -> None:
        """Keep a spooled row's direct send: its late outcome decides, not a second send."""
        if future.done():
            self._settle_pin(seq, lane, sent_ms, future)
            return
        self._pinned[seq] = lane
        future.add_done_callback(functools.partial(self._settle_pin, seq, lane, sent_ms))

    def _settle_pin(
        self, seq: int, lane: Lane, sent_ms: int, future: asyncio.Future[Placement]
    ) -> None:
        self._pinned.pop(seq, None)
        if _succeeded(future):
            self._metrics.late_acknowledgements.inc()
            self._acknowledged(seq, lane)
        else:
            error = _error(future)
            self._doubt(seq, sent_ms, error)
            if not future.cancelled() and classify(error) is Failure.PRODUCER:
                self._renew = True
        self._unblocked()

    def _doubt(self, seq: int, sent_ms: int, error: BaseException) -> None:
        """Remember a row whose send may have landed although it failed."""
        if may_have_landed(error):
            self._doubtful[seq] = min(self._doubtful.get(seq, sent_ms), sent_ms)

    def _release_when_done(
        self, futures: Sequence[asyncio.Future[Placement]], lanes: Sequence[Lane]
    ) -> None:
        """Free the lanes of records not kept anywhere once their sends end (never sooner)."""
        for future, lane in zip(futures, lanes, strict=True):
            if future.done():
                self._release(lane)
            else:
                future.add_done_callback(functools.partial(self._release_after, lane))

    async def _wait_free(self, lanes: list[Lane], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        for lane in lanes:
            while lane in self._held:
                waiter: asyncio.Future[None] = loop.create_future()
                self._free.setdefault(lane, []).append(waiter)
                try:
                    async with asyncio.timeout_at(deadline):
                        await waiter
                except TimeoutError:
                    raise Unavailable("Kafka unavailable: timeout") from None

    def _release_after(self, lane: Lane, _: asyncio.Future[Placement]) -> None:
        self._release(lane)

    def _hold(self, lanes: Iterable[Lane]) -> None:
        for lane in lanes:
            self._held[lane] = self._held.get(lane, 0) + 1

    def _release(self, lane: Lane) -> None:
        left = self._held.get(lane, 0) - 1
        if left > 0:
            self._held[lane] = left
            self._unblocked()  # the lane's next row may go now
            return
        self._held.pop(lane, None)
        for waiter in self._free.pop(lane, ()):
            if not waiter.done():
                waiter.set_result(None)
        self.changed.set()

    def _acknowledged(self, seq: int, lane: Lane) -> None:
        self._doubtful.pop(seq, None)
        self._acked[seq] = lane
        self._release(lane)
        self._progress()
        self.wakeup.set()  # to delete the row

    def _unblocked(self) -> None:
        self._scan = True
        self.wakeup.set()

    def _progress(self) -> None:
        self._last_progress = time.monotonic()
        self._backoff = MIN_BACKOFF

    # The spool's side ---------------------------------------------------------------

    def stalled(self) -> bool:
        """Spooled records wait and none was delivered or moved aside for STALL seconds."""
        if self._spool is None or not self._spool.records:
            self._last_progress = time.monotonic()
            return False
        return time.monotonic() - self._last_progress > self._stall_seconds

    def busy(self) -> bool:
        """Anything unresolved: spooled rows, or sends in progress."""
        return bool(self._held or self._acked) or bool(self._spool and self._spool.records)

    async def run(self) -> None:
        """Send spooled rows to Kafka, in arrival order per lane, forever. Cancel to stop."""
        if self._spool is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            await self.step()
            if self._retry_at > loop.time() and self._spool.records:
                loop.call_at(self._retry_at, self._unblocked)
            # Let events that come in a burst (acknowledgements, new rows) share a round.
            await asyncio.sleep(ROUND_PAUSE)

    async def step(self) -> None:
        """One round: take finished sends, delete acknowledged rows, send what may go."""
        await self._take_finished()
        await self._delete_acknowledged()
        if self._renew and asyncio.get_running_loop().time() >= self._retry_at:
            await self._renew_producer()
        await self._send_ready()

    async def _take_finished(self) -> None:
        finished, self._finished = self._finished, []
        if finished:
            self._scan = True  # room in the window again
        failed = False
        for row, sent_ms, future in finished:
            lane = self._sending.pop(row.seq)
            self._sending_bytes -= row.size
            if _succeeded(future):
                self._acknowledged(row.seq, lane)
                continue
            error = _error(future)
            kind = classify(error)
            if kind is Failure.RECORD:
                await self._quarantine(row, lane, error)
                continue
            failed = True
            self._doubt(row.seq, sent_ms, error)
            if kind is Failure.PRODUCER:
                self._renew = True
            elif kind is Failure.TOPIC:
                self._refused(row, error)
            self._metrics.spool_send_failures.labels(kind=kind.value).inc()
        if failed:
            loop = asyncio.get_running_loop()
            self._retry_at = loop.time() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    async def _quarantine(self, row: SpooledRecord, lane: Lane, error: BaseException) -> None:
        assert self._spool is not None
        reason = failure_reason(error)
        log.error(
            "Kafka refuses a spooled record for good; it is moved to the spool's quarantine "
            "so the records behind it are not held up (see `luma-kafka-bridge spool inspect`)",
            extra={"fields": {"seq": row.seq, "topic": row.record.topic, "reason": reason}},
        )
        await self._spool.quarantine(row.seq, reason)
        self._doubtful.pop(row.seq, None)
        self._release(lane)
        self._progress()
        self._copy_to_dead_letters(row.record, reason)

    def _copy_to_dead_letters(self, record: Record, reason: str) -> None:
        """Show a quarantined record where operators and consumers look for refused input;
        the spool's quarantine keeps it either way (the dead-letter topic may refuse it too)."""
        topic = self._dead_letter_topic
        if topic is None or record.topic == topic:
            return
        headers = refused_record_letter_headers(record.headers, record.topic, reason)
        [future] = self._publisher.send([Record(topic, None, record.value, headers)])
        future.add_done_callback(self._dead_letter_sent)

    def _dead_letter_sent(self, future: asyncio.Future[Placement]) -> None:
        if _succeeded(future):
            self._metrics.deadletters.labels(reason="kafka_refused").inc()
            return
        log.warning(
            "the dead-letter topic did not take a copy of a quarantined record; it stays in "
            "the spool's quarantine only (see `luma-kafka-bridge spool inspect`)",
            extra={"fields": {"reason": failure_reason(_error(future))}},
        )

    def _refused(self, row: SpooledRecord, error: BaseException) -> None:
        reason = failure_reason(error)
        if reason != self._last_refusal:
            log.error(
                "Kafka refuses the topic or this client; spooled records wait until an "
                "operator fixes it (ACLs, TOPIC_PREFIX, the topics: `luma-kafka-bridge topics "
                "create`)",
                extra={"fields": {"topic": row.record.topic, "reason": reason}},
            )
        self._last_refusal = reason

    async def _delete_acknowledged(self) -> None:
        if not self._acked or self._spool is None:
            return
        done = list(self._acked)
        try:
            await self._spool.remove(done)
        except SpoolUnwritable:
            # Kept as acknowledged in memory: never sent again; the delete is retried.
            self._retry_at = asyncio.get_running_loop().time() + self._backoff
            return
        for seq in done:
            self._acked.pop(seq, None)
        if self._spool.records == 0:
            log.info("spool drained")

    async def _renew_producer(self) -> None:
        self._renew = False
        try:
            await self._publisher.renew()
        except KafkaUnavailable:
            self._renew = True
            self._retry_at = asyncio.get_running_loop().time() + self._backoff
            return
        self._scan = True

    async def _send_ready(self) -> None:
        spool = self._spool
        assert spool is not None
        loop = asyncio.get_running_loop()
        if not self._scan or not spool.records or loop.time() < self._retry_at or self._renew:
            return
        self._scan = False
        if len(self._pinned) + len(self._sending) + len(self._acked) >= spool.records:
            return  # every row is accounted for (an outage: all pending in the producer)
        blocked = self._busy_lanes()
        chosen: list[int] = []
        room_records = self.WINDOW_RECORDS - len(self._sending)
        room_bytes = self.WINDOW_BYTES - self._sending_bytes
        after, scanned = 0, 0
        while room_records > 0 and scanned < self.SCAN_ROWS:
            index = await spool.index(after, 1000)
            if not index:
                break
            scanned += len(index)
            after = index[-1][0]
            for seq, lane, size in index:
                if seq in self._acked or lane in blocked:
                    continue
                blocked.add(lane)  # one record per lane, and the oldest first
                if size > room_bytes and (chosen or self._sending):
                    # No room left; a row larger than the whole window goes alone.
                    room_records = 0
                    break
                chosen.append(seq)
                room_records -= 1
                room_bytes -= size
                if room_records <= 0:
                    break
        if not chosen:
            return
        # The reads above awaited: a lane may have become busy meanwhile (a direct send that
        # timed out and is being spooled with an earlier arrival number). Decide now.
        busy = self._busy_lanes()
        rows = [
            row
            for row in await spool.rows(chosen)
            if lane_of(row.record) not in busy and row.seq not in self._acked
        ]
        rows = await self._without_landed(rows)
        if not rows:
            return
        sent_ms = _now_ms()
        futures = self._publisher.send([row.record for row in rows])
        for row, future in zip(rows, futures, strict=True):
            self._sending[row.seq] = lane_of(row.record)
            self._sending_bytes += row.size
            future.add_done_callback(functools.partial(self._send_finished, row, sent_ms))

    async def _without_landed(self, rows: list[SpooledRecord]) -> list[SpooledRecord]:
        """`rows` less the doubtful ones Kafka already holds, which count as acknowledged."""
        doubtful = [row for row in rows if row.seq in self._doubtful]
        if not doubtful:
            return rows
        since = min(self._doubtful[row.seq] for row in doubtful) - LOOKUP_CLOCK_MARGIN_MS
        try:
            found = await self._publisher.find(
                [row.record for row in doubtful], since, within=LOOKUP_SECONDS
            )
        except KafkaUnavailable as exc:
            # Sending is how the drainer learns Kafka is back; a send that fails again
            # leaves the row doubtful, and one that succeeds may be a second copy.
            log.warning(
                "cannot look up records whose send failed without an answer; sending them "
                "again, which may write them twice (the bridge needs read access to its topics)",
                extra={"fields": {"records": len(doubtful), "reason": exc.reason}},
            )
            self._metrics.resend_lookups.labels(outcome="failed").inc(len(doubtful))
            return rows
        landed = {row.seq for row, hit in zip(doubtful, found, strict=True) if hit}
        self._metrics.resend_lookups.labels(outcome="found").inc(len(landed))
        self._metrics.resend_lookups.labels(outcome="absent").inc(len(doubtful) - len(landed))
        for row in doubtful:
            if row.seq in landed:
                self._acknowledged(row.seq, lane_of(row.record))
            else:
                self._doubtful.pop(row.seq, None)
        return [row for row in rows if row.seq not in landed]

    def _busy_lanes(self) -> set[Lane]:
        """Lanes with a record in the producer: nothing more of theirs may be sent."""
        busy = set(self._direct)
        busy.update(self._pinned.values())
        busy.update(self._sending.values())
        return busy

    def _send_finished(
        self, row: SpooledRecord, sent_ms: int, future: asyncio.Future[Placement]
    ) -> None:
        self._finished.append((row, sent_ms, future))
        self.wakeup.set()

    async def settle(self, deadline: float) -> None:
        """At shutdown: keep draining until nothing is unresolved or `deadline` (monotonic)."""
        while self.busy() and time.monotonic() < deadline:
            self.changed.clear()
            self.wakeup.set()
            left = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, min(left, 0.2))):
                    await self.changed.wait()
            except TimeoutError:
                pass
        if self._spool is not None and self._acked:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await self._delete_acknowledged()
            except TimeoutError:
                log.warning("could not delete acknowledged rows in time; they are sent again")
        await self._mark_unresolved()

    async def _mark_unresolved(self) -> None:
        """Leave the next process the rows that may be in Kafka already: in the producer,
        failed without an answer, or acknowledged but not yet deleted."""
        if self._spool is None:
            return
        unresolved = {*self._sending, *self._pinned, *self._doubtful, *self._acked}
        try:
            async with asyncio.timeout(MARK_SECONDS):
                await self._spool.mark_doubtful(
                    {seq: self._doubtful.get(seq) for seq in sorted(unresolved)}
                )
        except (TimeoutError, SpoolUnwritable) as exc:
            log.warning(
                "could not note which spooled rows may be in Kafka already; the next start "
                "sends them again without looking, which may write them twice",
                extra={"fields": {"rows": len(unresolved), "reason": type(exc).__name__}},
            )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _succeeded(future: asyncio.Future[Placement]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _error(future: asyncio.Future[Placement]) -> BaseException:
    if future.cancelled():
        return ProducerClosed()  # type: ignore[no-any-return]  # aiokafka ships no type stubs
    error = future.exception()
    if error is None:
        return ProducerClosed()  # type: ignore[no-any-return]  # aiokafka ships no type stubs
    return error


def _reason(futures: Sequence[asyncio.Future[Placement]]) -> str:
    for future in futures:
        if future.done() and not _succeeded(future):
            return failure_reason(_error(future))
    return "timeout"


def _unavailable(exc: BaseException) -> BaseException:
    if isinstance(exc, SpoolFull):
        return Unavailable("Kafka unavailable and the spool is full", spool_full=True)
    if isinstance(exc, SpoolUnwritable):
        return Unavailable("Kafka unavailable and the spool cannot be written")
    return exc
