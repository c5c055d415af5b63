"""The reconciler: follows `{prefix}.lifecycle`, and writes the states Luma's callbacks lost.

One consumer group on the lifecycle topic spreads generations over reconcilers by
partition. For each generation of its partitions a reconciler keeps the furthest
state Kafka holds and when it landed (`tracking.Tracker`), and writes every change to
`{prefix}.reconciler-state`, a compacted topic with the lifecycle topic's partition
count, keyed by generation id so each lifecycle partition's entries live in the same
partition number. Its consumer offsets are committed only after those changes are
acknowledged, so after a restart (or when a partition moves to another reconciler) the
state is rebuilt from the changelog and the lifecycle records after the committed
offset; nothing is kept on local disk.

Every `RECONCILE_INTERVAL_SECONDS` a pass looks up, with `generations.get`, each
generation silent in a non-terminal state for longer than `RECONCILE_AFTER_SECONDS`,
and (when `PUBLIC_URL` is set) pages through `generations.list` for generations of
this bridge that Kafka never saw. Before it writes anything for a generation it reads
that generation's lifecycle partition to its end, under a lock that a partition
revocation waits for: a state written by a previous run, by itself a moment ago, or by
the receiver is seen first, so no state is written twice when the reconciler is
killed and restarted, or when partitions move. It writes only a state later than the
one Kafka holds, and only the state Luma reports: states it never saw are not
invented. Records carry the receiver's contract (`contract.callback`) and
`luma-source: reconciler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from bridge.contract.callback import (
    RECONCILE_NOT_FOUND_ERROR,
    SOURCE_RECONCILER,
    STATE_RANK,
    Callback,
    InvalidCallback,
    Topics,
    deadletter_headers,
    decode_object,
    encode_compact,
    parse_callback,
    parse_timestamp,
    record_headers,
    redact_callback_token,
)
from bridge.delivery.pacing import pace_metadata_updates
from bridge.delivery.publisher import (
    KafkaPublisher,
    KafkaUnavailable,
    Placement,
    Publisher,
    Record,
    keyed_partitioner,
    producer_options,
    stop_producer,
)
from bridge.delivery.topics import admin_session, existing_topics, raise_for_topic_errors
from bridge.ops.metrics import Metrics, ReconcilerMetrics, stuck_age_label
from bridge.reconcile.luma import GenerationNotFound, KeyRejected, LumaAPIError, LumaClient
from bridge.reconcile.tracking import Tracked, Tracker, decode_entry, encode_entry
from bridge.settings import Settings, consumer_options, security_options

log = logging.getLogger("bridge.reconcile")

STATE_HEADER = "luma-state"
#: Discovery's pages: `limit`, and how many entries two successive pages share, so that
#: generations created while paging (which push older ones down the list) are not skipped.
PAGE_SIZE = 100
PAGE_OVERLAP = 25
MAX_PAGES = 2000
#: How long reading a lifecycle partition to its end may take before the action waits
#: for the next pass.
CATCH_UP_SECONDS = 15.0
CHECKPOINT_SECONDS = 5.0
WRITE_TIMEOUT = 30.0
#: Of SHUTDOWN_TIMEOUT, kept for closing the producers once the group is left (or not).
SHUTDOWN_MARGIN = 1.0


class ReconcilerError(RuntimeError):
    """The reconciler cannot run with these settings or this cluster; the message says why."""


_T = TypeVar("_T")


class _Stopped(Exception):
    """The reconciler was asked to stop before a read or a request was answered."""


async def _unless_stopped(stopping: asyncio.Event, read: Awaitable[_T]) -> _T:
    """What `read` returns, or `_Stopped` as soon as `stopping` is set.

    For what changes nothing (a poll of the lifecycle topic, a request to Luma's API): a
    stop abandons it rather than wait, for as long as a group join with Kafka away, or
    through the API's timeouts, retries and backoff. Either outlasts Kubernetes' grace
    period, and the state would be killed unsaved.
    """
    answer = asyncio.ensure_future(read)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait((answer, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        answer.cancel()  # nothing when it is done
    if answer in done:
        return answer.result()
    with contextlib.suppress(asyncio.CancelledError):
        await answer
    raise _Stopped


def state_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}.reconciler-state"


def group_id(settings: Settings) -> str:
    return settings.reconcile_group_id or f"{settings.kafka_client_id}-reconciler"


def belongs_to_bridge(callback_url: object, public_url: str) -> bool:
    """Whether a generation's `request.callback_url` points at this bridge's `public_url`.

    The prefix must end at a path boundary: `/luma/callback-other` is not `/luma/callback`.
    """
    if not isinstance(callback_url, str):
        return False
    base = public_url.rstrip("/")
    if not callback_url.startswith(base):
        return False
    rest = callback_url[len(base) :]
    return rest == "" or rest[0] in "/?#"


def partition_of(generation_id: str, partitions: int) -> int:
    """The lifecycle partition the producers put a generation's records in."""
    all_partitions = list(range(partitions))
    return keyed_partitioner(generation_id.encode(), all_partitions, all_partitions)


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc] # aiokafka is untyped
    def __init__(self, reconciler: Reconciler) -> None:
        self._reconciler = reconciler

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._reconciler.release(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._reconciler.take_over(assigned)


class Reconciler:
    """Completes lifecycles from Luma's API. `start()`, then `run()` until stopped, `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        luma: LumaClient,
        metrics: ReconcilerMetrics,
        publisher: Publisher | None = None,
        clock: Any = time.time,
    ) -> None:
        if not settings.lifecycle_topic:
            raise ReconcilerError(
                "the reconciler follows the lifecycle topic: set LUMA_BRIDGE_LIFECYCLE_TOPIC=true "
                "on the bridge and here"
            )
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.state_topic = state_topic(settings)
        self.luma = luma
        self.metrics = metrics
        self.tracker = Tracker()
        self.discovering = bool(settings.reconcile_discover and settings.public_url)
        self._clock = clock
        self._publisher = publisher or KafkaPublisher(
            settings, metrics=Metrics(_private_registry())
        )
        self._owns_publisher = publisher is None
        self._consumer: AIOKafkaConsumer | None = None
        self._changelog: AIOKafkaProducer | None = None
        self._lifecycle_partitions = 0
        # Held while acting on a generation and while partitions are revoked: a partition
        # moves to another reconciler only between two actions.
        self._acting = asyncio.Lock()
        # Per lifecycle partition: the offset after the last record applied to the entries.
        self._applied: dict[int, int] = {}
        # Partitions whose changelog is still being read: not acted on yet.
        self._restoring: set[int] = set()
        self._restore_failed: set[int] = set()
        # Per lifecycle partition: an end offset up to which everything is in the entries.
        self._known_end: dict[int, int] = {}
        self.key_rejected = False
        self.started = False
        self.last_tick = time.monotonic()

    # -- start-up and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        """Check the topics (creating the changelog topic if missing), join the group.

        Raises `ReconcilerError` when the lifecycle topic is missing or the changelog topic
        does not match it, aiokafka's `KafkaError` when Kafka cannot be reached.
        """
        self._lifecycle_partitions = await ensure_state_topic(self.settings)
        self._changelog = AIOKafkaProducer(**producer_options(self.settings))
        pace_metadata_updates(self._changelog.client)
        await _started(self._changelog)
        if self._owns_publisher:
            assert isinstance(self._publisher, KafkaPublisher)
            try:
                await self._publisher.start()
            except KafkaUnavailable as exc:
                raise KafkaError(f"cannot connect the producer: {exc.reason}") from exc
        self._consumer = AIOKafkaConsumer(
            group_id=group_id(self.settings),
            auto_offset_reset="earliest",
            # A revocation waits for the action in progress (a read to the end, a write).
            rebalance_timeout_ms=120_000,
            max_poll_interval_ms=600_000,
            fetch_max_wait_ms=100,
            **consumer_options(self.settings, "reconciler"),
        )
        await _started(self._consumer)
        self._consumer.subscribe([self.topics.lifecycle], listener=_Revocations(self))
        self.started = True

    async def stop(self) -> None:
        """Write the state changes, commit, leave the group, within SHUTDOWN_TIMEOUT. Safe to
        call twice.

        Bounded because Kubernetes kills the pod after its grace period whatever it is
        doing: a stop that cannot reach Kafka says so and ends, what it could not save is
        read again from the lifecycle topic by whoever takes the partitions next.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await self._save_state_and_leave(consumer, deadline - SHUTDOWN_MARGIN)
        # Both have nothing left to flush: a checkpoint and a write wait for their acks.
        changelog, self._changelog = self._changelog, None
        if changelog is not None:
            await stop_producer(changelog, deadline - SHUTDOWN_MARGIN / 2 - loop.time())
        if self._owns_publisher and isinstance(self._publisher, KafkaPublisher):
            await self._publisher.stop(timeout=deadline - loop.time())
        self.started = False

    async def _save_state_and_leave(self, consumer: AIOKafkaConsumer, deadline: float) -> None:
        """Checkpoint, then leave the group, by `deadline` (the loop's clock)."""
        before = asyncio.all_tasks()
        saved = False
        try:
            async with asyncio.timeout_at(deadline):
                saved = await self._save_state(consumer)
                await consumer.stop()
        except TimeoutError:
            await _abandon(consumer, asyncio.all_tasks() - before)
            fields = _fields(shutdown_timeout_s=self.settings.shutdown_timeout)
            if saved:
                log.error(
                    "the state was saved, but Kafka did not answer the group's leave within "
                    "SHUTDOWN_TIMEOUT; the partitions move to another reconciler after the "
                    "session timeout",
                    extra=fields,
                )
            else:
                log.error(
                    "the state was not saved within SHUTDOWN_TIMEOUT: Kafka did not answer; "
                    "nothing is lost, whoever reconciles these partitions next reads the "
                    "lifecycle topic again from the last commit",
                    extra=fields,
                )

    async def _save_state(self, consumer: AIOKafkaConsumer) -> bool:
        try:
            async with self._acting:
                await self._checkpoint(consumer)
        except KafkaError as exc:
            log.warning("could not save the state at shutdown", extra=_fields(error=exc))
            return False
        return True

    # -- the group: taking over and handing back partitions -------------------------------

    async def take_over(self, assigned: Iterable[TopicPartition]) -> None:
        """Rebuild the entries of newly assigned lifecycle partitions from the changelog.

        aiokafka fetches for the new partitions while this runs: their records are followed
        at once and the changelog's entries are merged in afterwards. Until then the
        partition is not acted on.
        """
        new = sorted(tp.partition for tp in assigned if tp.partition not in self.tracker.partitions)
        if not new:
            return
        for partition in new:
            self.tracker.assign(partition)
            self._restoring.add(partition)
        await self._restore(new)
        log.info(
            "partitions taken over",
            extra=_fields(partitions=new, restoring=sorted(self._restoring)),
        )
        self._update_gauges()

    async def _restore(self, partitions: list[int]) -> None:
        """Merge the changelog into the entries of `partitions`; on failure they stay blocked
        (acting without the saved state could write what is already there) and the next pass
        tries again."""
        try:
            entries = await load_changelog(self.settings, self.state_topic, partitions)
        except KafkaError as exc:
            log.error(
                "cannot read the changelog topic; these partitions wait until it can be read",
                extra=_fields(partitions=partitions, error=type(exc).__name__),
            )
            self._restore_failed.update(partitions)
            return
        self._restore_failed.difference_update(partitions)
        for partition in partitions:
            if partition in self.tracker.partitions:
                self.tracker.restore(partition, entries.get(partition, {}))
        self._restoring.difference_update(partitions)
        log.info(
            "state restored from the changelog",
            extra=_fields(restored={str(p): len(entries.get(p, {})) for p in partitions}),
        )

    async def release(self, revoked: Iterable[TopicPartition]) -> None:
        """Save and drop the entries of revoked partitions, once the current action is done."""
        partitions = sorted(tp.partition for tp in revoked)
        committed: dict[str, int] = {}
        async with self._acting:
            if self._consumer is not None:
                try:
                    committed = await self._checkpoint(self._consumer)
                except KafkaError as exc:
                    # The next owner re-reads from the last commit: slower, not wrong.
                    log.warning(
                        "could not save the state of revoked partitions", extra=_fields(error=exc)
                    )
            for partition in partitions:
                self.tracker.revoke(partition)
                self._known_end.pop(partition, None)
                self._restoring.discard(partition)
                self._restore_failed.discard(partition)
                self._applied.pop(partition, None)
        log.info(
            "partitions handed back", extra=_fields(partitions=partitions, committed=committed)
        )

    # -- the main loop ----------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Follow the lifecycle topic and reconcile every interval until `stopping` is set."""
        consumer = self._require_consumer()
        next_pass = time.monotonic() + min(self.settings.reconcile_interval_seconds, 1.0)
        next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        while not stopping.is_set():
            self.last_tick = time.monotonic()
            poll = consumer.getmany(timeout_ms=500, max_records=10_000)
            try:
                batch = await _unless_stopped(stopping, poll)
            except _Stopped:
                break
            except KafkaError as exc:
                # aiokafka reconnects by itself; say so and go round again.
                log.warning(
                    "reading the lifecycle topic failed; retrying", extra=_fields(error=exc)
                )
                await asyncio.sleep(1.0)
                continue
            self._apply(batch)
            if time.monotonic() >= next_pass:
                try:
                    await self.reconcile_once(stopping)
                except KafkaError as exc:
                    log.warning(
                        "a pass stopped on a Kafka error; next pass", extra=_fields(error=exc)
                    )
                except Exception:
                    # A bug must not stop the repairs of every other generation; it is logged
                    # with its traceback and the next pass starts over.
                    log.exception("a reconciliation pass failed; next pass")
                next_pass = time.monotonic() + self.settings.reconcile_interval_seconds
            if time.monotonic() >= next_checkpoint:
                try:
                    async with self._acting:
                        await self._checkpoint(consumer)
                except KafkaError as exc:
                    log.warning("could not save the state; retrying", extra=_fields(error=exc))
                next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS

    async def reconcile_once(self, stopping: asyncio.Event | None = None) -> None:
        """One pass: look up stuck generations, then discover unseen ones."""
        if self._lifecycle_partitions < 1:
            # Discovery places generations by the topic's partition count, read by start().
            raise ReconcilerError("the reconciler is not started: call start() first")
        stopping = stopping or asyncio.Event()
        if self._restore_failed:
            await self._restore(sorted(self._restore_failed & self.tracker.partitions))
        now = self._clock()
        self.tracker.prune(now - self.settings.reconcile_lookback_seconds - 3600)
        self._update_gauges()
        budget_ends = time.monotonic() + max(self.settings.reconcile_interval_seconds, 30.0)
        for partition, generation_id, _ in self.tracker.stuck(
            now, self.settings.reconcile_after_seconds
        ):
            if stopping.is_set() or time.monotonic() > budget_ends or self.key_rejected:
                break
            await self._look_up(partition, generation_id, stopping)
        if self.discovering and not stopping.is_set() and not self.key_rejected:
            await self._discover(stopping, budget_ends)
        self._update_gauges()
        self.metrics.passes.inc()
        self.metrics.last_pass.set(self._clock())

    # -- lookups ------------------------------------------------------------------------

    async def _look_up(self, partition: int, generation_id: str, stopping: asyncio.Event) -> None:
        try:
            body = await _unless_stopped(stopping, self.luma.get(generation_id))
        except _Stopped:
            return  # looked up again by whoever owns the partition next
        except GenerationNotFound:
            await self._dead_letter(partition, generation_id)
            return
        except KeyRejected:
            self._key_was_rejected()
            return
        except LumaAPIError as exc:
            self.metrics.lookups.labels(outcome="error").inc()
            log.warning(
                "Luma's API did not answer a lookup; retrying next pass",
                extra=_fields(generation_id=generation_id, reason=exc.reason, status=exc.status),
            )
            return
        outcome = await self._act(partition, generation_id, body, kind="stale")
        self.metrics.lookups.labels(outcome=outcome).inc()

    def _key_was_rejected(self) -> None:
        if not self.key_rejected:
            log.error(
                "Luma's API refused the API key (401/403): check LUMA_BRIDGE_LUMA_API_KEY; "
                "nothing is reconciled until the reconciler restarts with a valid key"
            )
        self.key_rejected = True
        self.metrics.ready.set(0)

    async def _act(self, partition: int, generation_id: str, body: bytes, *, kind: str) -> str:
        """Write Luma's state of a generation if Kafka holds an earlier one (or none, for
        `discovered`); returns the lookup outcome."""
        callback = self._callback_from_api(generation_id, body)
        if callback is None:
            return "error"
        if callback.state not in STATE_RANK:
            log.warning(
                "Luma's API reports a state the reconciler does not know; not written",
                extra=_fields(generation_id=generation_id, state=callback.state[:40]),
            )
            return "unknown_state"
        async with self._acting:
            if not await self._caught_up(partition):
                return "error"
            entry = self.tracker.get(partition, generation_id)
            before = entry.state if entry is not None else None
            if kind == "stale" and (entry is None or entry.done):
                return "unchanged"  # finished or handed back meanwhile
            if kind == "discovered" and entry is not None:
                return "unchanged"  # Kafka has it now
            now = self._clock()
            if entry is not None and STATE_RANK[callback.state] <= STATE_RANK.get(entry.state, -1):
                self.tracker.confirm(partition, generation_id, now)
                return "unchanged"
            if not await self._write(self._records(callback, now), partition, generation_id):
                return "error"
            self.tracker.observe(partition, generation_id, callback.state, now)
        self.metrics.records_written.labels(state=callback.state, kind=kind).inc()
        log.info(
            "wrote a state its callback never delivered",
            extra=_fields(
                generation_id=generation_id,
                state=callback.state,
                kind=kind,
                before=before,
            ),
        )
        return "repaired"

    def _callback_from_api(self, generation_id: str, body: bytes) -> Callback | None:
        """Luma's answer as the receiver would have made it, the write token redacted."""
        try:
            document = redact_callback_token(decode_object(body), self.settings.callback_path)
            callback = parse_callback(encode_compact(document))
        except InvalidCallback as exc:
            log.warning(
                "Luma's API answered something that is not a valid Generation",
                extra=_fields(generation_id=generation_id, reason=exc.reason),
            )
            return None
        if callback.generation_id != generation_id:
            log.warning(
                "Luma's API answered with another generation's id",
                extra=_fields(generation_id=generation_id),
            )
            return None
        return callback

    def _records(self, callback: Callback, now: float) -> list[Record]:
        key = callback.generation_id.encode()
        received_at = datetime.fromtimestamp(now, UTC)
        headers = record_headers(
            callback,
            received_at,
            cloudevents=self.settings.cloudevents_options(),
            source=SOURCE_RECONCILER,
        )
        return [
            Record(self.topics.for_state(callback.state), key, callback.value, headers),
            Record(self.topics.lifecycle, key, callback.value, headers),
        ]

    async def _dead_letter(self, partition: int, generation_id: str) -> None:
        """Luma's API does not know the generation: say so on the dead-letter topic, stop."""
        async with self._acting:
            if not await self._caught_up(partition):
                return
            entry = self.tracker.get(partition, generation_id)
            if entry is None or entry.done:
                return
            now = self._clock()
            value = encode_compact({"id": generation_id, "last_state": entry.state})
            # The dead-letter contract: no key, the value as bytes, luma-error says why.
            headers = deadletter_headers(
                RECONCILE_NOT_FOUND_ERROR, datetime.fromtimestamp(now, UTC)
            )
            record = Record(self.topics.deadletter, None, value, headers)
            if not await self._write([record], partition, generation_id):
                return
            self.tracker.finish(partition, generation_id, now)
        self.metrics.lookups.labels(outcome="not_found").inc()
        self.metrics.deadletters.inc()
        log.warning(
            "Luma's API does not know this generation; written to the dead-letter topic, "
            "tracking ended",
            extra=_fields(generation_id=generation_id, last_state=entry.state),
        )

    async def _write(self, records: list[Record], partition: int, generation_id: str) -> bool:
        try:
            placements = await self._publisher.publish(records, WRITE_TIMEOUT)
        except KafkaUnavailable as exc:
            # It may still land: the end we know is no longer to be trusted.
            self._known_end.pop(partition, None)
            log.warning(
                "Kafka did not acknowledge a reconciled state; retrying next pass",
                extra=_fields(generation_id=generation_id, reason=exc.reason),
            )
            return False
        self._wrote(partition, placements)
        return True

    # -- discovery ----------------------------------------------------------------------

    async def _discover(self, stopping: asyncio.Event, budget_ends: float) -> None:
        """Page through `generations.list` for this bridge's generations Kafka never saw."""
        assert self.settings.public_url is not None
        now = self._clock()
        oldest = now - self.settings.reconcile_lookback_seconds
        youngest = now - self.settings.reconcile_after_seconds
        seen: set[str] = set()
        found: list[tuple[int, str, bytes]] = []
        offset = 0
        for _ in range(MAX_PAGES):
            if stopping.is_set() or time.monotonic() > budget_ends:
                break
            try:
                listing = self.luma.list_page(limit=PAGE_SIZE, offset=offset)
                page = decode_object(await _unless_stopped(stopping, listing))
            except _Stopped:
                return
            except KeyRejected:
                self._key_was_rejected()
                return
            except (LumaAPIError, InvalidCallback) as exc:
                log.warning(
                    "discovery stopped: Luma's API did not list generations",
                    extra=_fields(reason=getattr(exc, "reason", "invalid_answer")),
                )
                break
            generations = page.get("generations")
            if not isinstance(generations, list) or not generations:
                break
            all_too_old = True
            for generation in generations:
                created = _created_at(generation)
                if created is None or created >= oldest:
                    all_too_old = False
                candidate = self._candidate(generation, created, oldest, youngest, seen)
                if candidate is not None:
                    found.append(candidate)
            if all_too_old or not page.get("has_more", len(generations) >= PAGE_SIZE):
                break
            offset += PAGE_SIZE - PAGE_OVERLAP
        for partition, generation_id, body in found:
            if stopping.is_set():
                break
            await self._act(partition, generation_id, body, kind="discovered")

    def _candidate(
        self,
        generation: Any,
        created: float | None,
        oldest: float,
        youngest: float,
        seen: set[str],
    ) -> tuple[int, str, bytes] | None:
        if not isinstance(generation, dict):
            return None
        generation_id = generation.get("id")
        if not isinstance(generation_id, str) or not generation_id or generation_id in seen:
            return None
        seen.add(generation_id)
        if created is None or not oldest <= created <= youngest:
            return None  # out of the window, or so young its callbacks may still come
        request = generation.get("request")
        url = request.get("callback_url") if isinstance(request, dict) else None
        assert self.settings.public_url is not None
        if not belongs_to_bridge(url, self.settings.public_url):
            return None  # another system's generation in the same Luma account
        partition = partition_of(generation_id, self._lifecycle_partitions)
        if partition not in self.tracker.partitions:
            return None  # another reconciler's
        if self.tracker.get(partition, generation_id) is not None:
            return None
        return partition, generation_id, encode_compact(generation)

    # -- Kafka ----------------------------------------------------------------------------

    def _apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        for tp, records in batch.items():
            if records and tp.partition not in self.tracker.partitions:
                # Fetched before the partition was taken over (aiokafka assigns, then calls
                # the listener): read them again once it is.
                with contextlib.suppress(KafkaError, AssertionError, ValueError):
                    self._require_consumer().seek(tp, records[0].offset)
                continue
            for record in records:
                self._applied[tp.partition] = record.offset + 1
                if record.key is None:
                    continue
                state = _header(record, STATE_HEADER)
                if state is None:
                    continue
                self.tracker.observe(
                    tp.partition,
                    record.key.decode("utf-8", "replace"),
                    state,
                    record.timestamp / 1000,
                )

    async def _caught_up(self, partition: int) -> bool:
        """Read a lifecycle partition to its current end; False if it is no longer ours or the
        end was not reached in time.

        The records this reconciler wrote itself are already in its entries: when the end
        has moved only by them, nothing needs reading. (The embedded broker reports the end
        as the last batch's first offset + 1; a fetch returns whole batches, so reading up
        to it still reads the whole last batch.)
        """
        consumer = self._require_consumer()
        tp = TopicPartition(self.topics.lifecycle, partition)
        if (
            tp not in consumer.assignment()
            or partition not in self.tracker.partitions
            or partition in self._restoring
        ):
            return False
        end = (await consumer.end_offsets([tp]))[tp]
        if self._known_end.get(partition) == end:
            return True
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                log.warning(
                    "could not read a lifecycle partition to its end in time; acting next pass",
                    extra=_fields(partition=partition),
                )
                return False
            self._apply(await consumer.getmany(tp, timeout_ms=200))
        self._known_end[partition] = end
        log.debug("caught up", extra=_fields(partition=partition, end=end))
        return True

    def _wrote(self, partition: int, placements: list[Placement]) -> None:
        """Our own lifecycle record landed: if right at the end we had read to, the end we
        know moves past it (nothing else came in between)."""
        for placement in placements:
            if placement.topic != self.topics.lifecycle or placement.partition != partition:
                continue
            if self._known_end.get(partition) == placement.offset:
                self._known_end[partition] = placement.offset + 1
            else:
                self._known_end.pop(partition, None)

    async def _checkpoint(self, consumer: AIOKafkaConsumer) -> dict[str, int]:
        """Changed entries to the changelog, then the offsets they account for.

        The offsets and the changes are taken at the same moment, with no await between:
        records applied while the changelog is being written (a revocation runs beside the
        main loop) are neither saved nor committed, so the next owner reads them again.
        """
        changelog = self._changelog
        if changelog is None:
            return {}
        offsets = {
            TopicPartition(self.topics.lifecycle, partition): offset
            for partition, offset in self._applied.items()
            if partition in self.tracker.partitions
        }
        changes = self.tracker.take_changes()
        try:
            pending = [
                await changelog.send(
                    self.state_topic,
                    encode_entry(entry) if entry is not None else None,
                    key=generation_id.encode(),
                    partition=partition,
                )
                for partition, entries in changes.items()
                for generation_id, entry in entries.items()
            ]
            if pending:
                await asyncio.gather(*pending)
        except BaseException:  # a Kafka error, or a stop cut off by its timeout
            self.tracker.keep_changes(changes)
            raise
        owned = {tp: offset for tp, offset in offsets.items() if tp in consumer.assignment()}
        if owned:
            await consumer.commit(owned)
        return {str(tp.partition): offset for tp, offset in owned.items()}

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise ReconcilerError("the reconciler is not started")
        return self._consumer

    def _update_gauges(self) -> None:
        now = self._clock()
        self.metrics.tracked.set(self.tracker.tracked())
        counts: Counter[tuple[str, str]] = Counter()
        for _, _, entry in self.tracker.stuck(now, self.settings.reconcile_after_seconds):
            state = entry.state if entry.state in ("queued", "dreaming") else "other"
            counts[(state, stuck_age_label(now - entry.quiet_since))] += 1
        self.metrics.set_stuck(dict(counts))


def _header(record: Any, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode("utf-8", "replace")
    return None


def _created_at(generation: Any) -> float | None:
    created = generation.get("created_at") if isinstance(generation, dict) else None
    if not isinstance(created, str):
        return None
    try:
        return parse_timestamp(created).timestamp()
    except ValueError:
        return None


def _fields(**fields: Any) -> dict[str, Any]:
    return {"fields": fields}


def _private_registry() -> Any:
    # The producer's own series would repeat the receiver's names on the reconciler's
    # /metrics; it reports through the reconciler's metrics instead.
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


async def _abandon(consumer: AIOKafkaConsumer, started: set[asyncio.Task[Any]]) -> None:
    """Close a consumer whose stop was cut off (Kafka away): its connections first, so that
    what waits on them fails at once, then the rest; each step briefly. Of the tasks the
    stop `started`, a request that failed meanwhile (a commit aiokafka shields from
    cancelling) has its error taken: it is the one just reported."""
    # aiokafka has no public "close without leaving the group"; these are its own steps.
    for close in (consumer._client.close, consumer.stop):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.25):
                await close()
    for task in started:
        if task.done() and not task.cancelled():
            task.exception()


async def _started(client: Any) -> None:
    try:
        await client.start()
    except BaseException:
        await client.stop()  # start() leaves connections half-open on failure
        raise


def _admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.kafka_client_id}-reconciler-admin",
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **security_options(settings),
    )


async def partition_counts(settings: Settings, topics: list[str]) -> dict[str, int]:
    """How many partitions each existing topic of `topics` has.

    Asked of the cluster (DescribeTopics), not of a client's cached metadata, which on
    Apache Kafka lists only the topics that client has used. A topic created a moment ago
    can be listed before its partitions are: it is left out until they are.
    """
    async with admin_session(_admin(settings)) as admin:
        listed = set(await admin.list_topics())
        wanted = [topic for topic in topics if topic in listed]
        described = await admin.describe_topics(wanted) if wanted else []
    return {
        topic["topic"]: len(topic["partitions"])
        for topic in described
        if topic.get("error_code") == 0 and topic.get("partitions")
    }


#: How long a topic created a moment ago may take to show in the cluster's metadata.
TOPIC_VISIBLE_SECONDS = 30.0


async def _visible_partition_counts(settings: Settings, topic: str) -> dict[str, int]:
    """`partition_counts` of a topic just created, once the cluster's metadata shows it.

    Apache Kafka's metadata lags behind a creation for a moment; a consumer assigned to
    a topic its metadata does not show yet only logs errors.
    """
    deadline = time.monotonic() + TOPIC_VISIBLE_SECONDS
    while True:
        counts = await partition_counts(settings, [topic])
        if topic in counts:
            return counts
        if time.monotonic() > deadline:
            raise ReconcilerError(
                f"topic {topic} was created but is not in the cluster's metadata after "
                f"{TOPIC_VISIBLE_SECONDS:.0f} s; check the brokers' logs, then start again"
            )
        await asyncio.sleep(0.2)


async def ensure_state_topic(settings: Settings) -> int:
    """Create the compacted changelog topic if missing; returns the lifecycle's partition count.

    Raises `ReconcilerError` when the lifecycle topic is missing, or when the changelog
    topic's partition count differs from the lifecycle topic's (its entries would be read
    by the wrong reconciler).
    """
    lifecycle = Topics(settings.topic_prefix).lifecycle
    changelog = state_topic(settings)
    counts = await partition_counts(settings, [lifecycle, changelog])
    if lifecycle not in counts and lifecycle in await existing_topics(settings):
        counts.update(await _visible_partition_counts(settings, lifecycle))
    if lifecycle not in counts:
        raise ReconcilerError(
            f"topic {lifecycle} is missing on {settings.kafka_bootstrap_servers}: create the "
            "bridge's topics first (`luma-kafka-bridge topics create`, same settings)"
        )
    partitions = counts[lifecycle]
    if changelog not in counts:
        async with admin_session(_admin(settings)) as admin:
            topic = NewTopic(
                changelog,
                num_partitions=partitions,
                replication_factor=settings.topic_replication_factor,
                topic_configs={"cleanup.policy": "compact"},
            )
            with contextlib.suppress(TopicAlreadyExistsError):
                response = await admin.create_topics([topic])
                try:
                    raise_for_topic_errors(response)
                except KafkaError as exc:
                    raise ReconcilerError(
                        f"{exc}; check the replication factor (TOPIC_REPLICATION_FACTOR) and "
                        "the Kafka user's rights"
                    ) from None
            log.info(
                "changelog topic created", extra=_fields(topic=changelog, partitions=partitions)
            )
        counts = await _visible_partition_counts(settings, changelog)
    if counts.get(changelog, partitions) != partitions:
        raise ReconcilerError(
            f"topic {changelog} has {counts[changelog]} partitions but {lifecycle} has "
            f"{partitions}: they must match; delete {changelog} (the reconciler rebuilds it "
            "from the lifecycle topic) or give it the same partition count"
        )
    return partitions


async def load_changelog(
    settings: Settings, topic: str, partitions: list[int]
) -> dict[int, dict[str, Tracked]]:
    """The entries of the changelog's `partitions`, each read from its start to its end."""
    reader = AIOKafkaConsumer(**consumer_options(settings, "reconciler-state"))
    await _started(reader)
    entries: dict[int, dict[str, Tracked]] = {partition: {} for partition in partitions}
    try:
        assigned = [TopicPartition(topic, partition) for partition in partitions]
        reader.assign(assigned)
        await reader.seek_to_beginning(*assigned)
        ends = await reader.end_offsets(assigned)
        remaining = {tp for tp in assigned if await reader.position(tp) < ends[tp]}
        while remaining:
            batch = await reader.getmany(*remaining, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    # Everything read counts, even past the end asked for: the embedded broker
                    # reports the end as the last batch's first offset + 1, and a newer entry
                    # is as good as the one it replaces.
                    if record.key is None:
                        continue
                    generation_id = record.key.decode("utf-8", "replace")
                    entry = decode_entry(record.value)
                    if entry is None:
                        entries[tp.partition].pop(generation_id, None)
                    else:
                        entries[tp.partition][generation_id] = entry
            remaining = {tp for tp in remaining if await reader.position(tp) < ends[tp]}
    finally:
        await reader.stop()
    return entries
