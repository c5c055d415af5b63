"""Reading what the bridge writes: an async iterator of typed generation events.

    async with GenerationConsumer(group_id="my-service", states=["completed"],
                                  bootstrap_servers="127.0.0.1:9092") as events:
        async for event in events:
            print(event.generation_id, event.asset_url)

What it adds to a bare `AIOKafkaConsumer`:

* **Commit after handling.** An event counts as handled when the caller asks for
  the next one (or calls `commit()`); only then may its offset be committed. An
  event the caller raised or broke out of is delivered again after a restart.
* **Dedupe.** Delivery is at-least-once; a record whose `luma-transition-id` (or, on
  records written before that header existed, `luma-event-id`) was seen within the
  last `window` events is skipped: a redelivered callback, and a callback and the
  reconciler's record of the same state transition, count once.
* **No going backwards.** A generation's state only moves forward
  (queued → dreaming → completed | failed). A late `dreaming` after `completed`
  (redelivery, or two topics read at different speeds) is yielded with
  `stale=True` and `furthest_state="completed"`, never as a new state.
* **Memory across restarts.** On (re)assignment of a partition with a committed
  offset, up to `window` already-handled records before it are read back
  silently, so dedupe and staleness hold across consumer restarts too.

The helper is written on aiokafka rather than a stream-processing framework
because all it needs is manual commits, a rebalance listener and seeks.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError

from bridge.contract.callback import KNOWN_STATES, Generation, Topics, parse_timestamp
from bridge.settings import Settings, consumer_options, load_settings

log = logging.getLogger("bridge.consume.consumer")

#: How far along its life a state is. Terminal states share the last rank, so a
#: `failed` after `completed` is reported as it is, not as stale.
STATE_PROGRESS: dict[str, int] = {"queued": 0, "dreaming": 1, "completed": 2, "failed": 2}

#: The states one may follow: the known ones and `unknown` (any state the bridge did not know).
FOLLOWABLE_STATES = (*KNOWN_STATES, "unknown")

#: W3C Trace Context headers, as the bridge (and OpenTelemetry's Kafka instrumentation) writes them.
TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()

EVENT_ID_HEADER = "luma-event-id"
TRANSITION_ID_HEADER = "luma-transition-id"
STATE_HEADER = "luma-state"
RECEIVED_AT_HEADER = "luma-received-at"


class MalformedRecord(ValueError):
    """A record on a generation topic that the bridge cannot have written."""


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """One callback as the bridge wrote it, with where it was read from."""

    generation: Generation
    state: str
    event_id: str
    received_at: datetime
    topic: str
    partition: int
    offset: int
    #: True when the generation was already seen further along (`furthest_state`).
    stale: bool = False
    furthest_state: str | None = None
    #: True for a repeated transition; only yielded when `skip_duplicates=False`.
    duplicate: bool = False
    #: `luma-transition-id`: the same for every record of one state transition (None on
    #: records written before the header existed).
    transition_id: str | None = None
    #: The record's Kafka timestamp: when the bridge wrote it (None when the broker gives none).
    written_at: datetime | None = None
    #: The record's W3C Trace Context headers (`traceparent`, `tracestate`), when it has them.
    trace_headers: tuple[tuple[str, str], ...] = ()

    def trace_context(self) -> Context:
        """The callback's trace context, for a span that continues its trace::

        with tracer.start_as_current_span("handle", context=event.trace_context()): ...
        """
        return _PROPAGATOR.extract(dict(self.trace_headers))

    @property
    def dedupe_key(self) -> str:
        """What duplicates share: the transition id, else the event id."""
        return self.transition_id or self.event_id

    @property
    def generation_id(self) -> str:
        return self.generation.id

    @property
    def generation_type(self) -> str | None:
        return self.generation.generation_type

    @property
    def model(self) -> str | None:
        """`model`, else the request's `model`, else `version` (older callbacks carry that)."""
        if self.generation.model:
            return self.generation.model
        requested = (self.generation.request or {}).get("model")
        if isinstance(requested, str):
            return requested
        return self.generation.version

    @property
    def asset_url(self) -> str | None:
        """The video, else the image, else the first other URL among the assets."""
        assets = self.generation.assets
        if assets is None:
            return None
        if assets.video or assets.image:
            return assets.video or assets.image
        for value in (assets.model_extra or {}).values():
            if isinstance(value, str) and value:
                return value
        return None

    @property
    def failure_reason(self) -> str | None:
        return self.generation.failure_reason


def event_from_record(record: Any) -> GenerationEvent:
    """Turn an aiokafka `ConsumerRecord` from a generation topic into an event.

    Raises `MalformedRecord` when a header is missing or the value is not a Generation.
    """
    headers = {name: value for name, value in record.headers or ()}
    try:
        event_id = headers[EVENT_ID_HEADER].decode()
        state = headers[STATE_HEADER].decode()
        received_at = parse_timestamp(headers[RECEIVED_AT_HEADER].decode())
        generation = Generation.model_validate_json(record.value)
        transition_header = headers.get(TRANSITION_ID_HEADER)
        transition = transition_header.decode() if transition_header is not None else None
    except KeyError as exc:
        raise MalformedRecord(f"missing header {exc.args[0]}") from None
    except (UnicodeDecodeError, ValueError, ValidationError, TypeError):
        raise MalformedRecord("value or headers are not what the bridge writes") from None
    return GenerationEvent(
        generation=generation,
        state=state,
        event_id=event_id,
        received_at=received_at,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        transition_id=transition,
        written_at=_timestamp(record),
        trace_headers=tuple(
            (name, headers[name].decode("latin-1")) for name in TRACE_HEADERS if name in headers
        ),
    )


def _timestamp(record: Any) -> datetime | None:
    """The record's timestamp (milliseconds since the epoch), None when it has none (-1)."""
    timestamp = getattr(record, "timestamp", None)
    if not isinstance(timestamp, int) or timestamp < 0:
        return None
    return datetime.fromtimestamp(timestamp / 1000, UTC)


class EventMemory:
    """The recent event ids, and how far each recent generation has got. Bounded LRU."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._event_ids: OrderedDict[str, None] = OrderedDict()
        self._furthest: OrderedDict[str, str] = OrderedDict()

    def observe(self, event_id: str, generation_id: str, state: str) -> tuple[bool, str | None]:
        """Remember an event; returns (duplicate, furthest state if this one is stale)."""
        if self._size == 0:
            return False, None
        duplicate = event_id in self._event_ids
        self._event_ids[event_id] = None
        self._event_ids.move_to_end(event_id)
        furthest = self._furthest.get(generation_id)
        progress = STATE_PROGRESS.get(state)
        stale = None
        if furthest is not None and progress is not None and STATE_PROGRESS[furthest] > progress:
            stale = furthest
        elif progress is not None:
            self._furthest[generation_id] = state
        if generation_id in self._furthest:
            self._furthest.move_to_end(generation_id)
        for recent in (self._event_ids, self._furthest):
            while len(recent) > self._size:
                recent.popitem(last=False)
        return duplicate, stale


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, owner: GenerationConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._owner._on_assigned(set(assigned))


class GenerationConsumer:
    """Async iterator of `GenerationEvent`s from chosen states or the lifecycle topic.

    Use `async with` (or `start()`/`stop()`), then `async for`. Keyword-only
    arguments, checked at once:

    * `group_id`: the Kafka consumer group; offsets are committed to it. `None`
      reads without a group (nothing is committed, nothing remembered across runs).
    * `states`: per-state topics to follow (`queued`, `dreaming`, `completed`,
      `failed`, `unknown`). With `lifecycle=True`, the lifecycle topic is read
      instead (every state of a generation in order) and only `states` are
      yielded (all when empty); the others still count towards staleness.
    * `settings`: connection, security and topic prefix; default `load_settings()`
      (the `LUMA_BRIDGE_*` environment), with `bootstrap_servers` overriding.
    * `start`: where a group with no committed offset begins.
    * `window`: event ids and generations remembered (0 turns dedupe and
      staleness off).
    * `skip_duplicates`: False yields repeats with `duplicate=True` instead.
    * `consumer_options`: further `AIOKafkaConsumer` keyword arguments (timeouts,
      fetch sizes); they override the helper's own.
    """

    def __init__(
        self,
        *,
        group_id: str | None,
        states: Sequence[str] = (),
        lifecycle: bool = False,
        settings: Settings | None = None,
        bootstrap_servers: str | None = None,
        start: Literal["earliest", "latest"] = "earliest",
        window: int = 10_000,
        skip_duplicates: bool = True,
        max_batch: int = 100,
        poll_timeout: float = 0.5,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        unknown = [state for state in states if state not in FOLLOWABLE_STATES]
        if unknown:
            raise ValueError(f"unknown states {unknown}; choose from {list(FOLLOWABLE_STATES)}")
        if not states and not lifecycle:
            raise ValueError("choose states to follow, or lifecycle=True")
        if start not in ("earliest", "latest"):
            raise ValueError("start must be 'earliest' or 'latest'")
        if window < 0 or max_batch < 1 or poll_timeout <= 0:
            raise ValueError("window must be >= 0, max_batch >= 1 and poll_timeout > 0")
        if settings is None:
            overrides = {"kafka_bootstrap_servers": bootstrap_servers} if bootstrap_servers else {}
            settings = load_settings(**overrides)
        elif bootstrap_servers:
            settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap_servers})
        topics = Topics(settings.topic_prefix)
        self.group_id = group_id
        self.topics: tuple[str, ...] = (
            (topics.lifecycle,)
            if lifecycle
            else tuple(dict.fromkeys(topics.for_state(state) for state in states))
        )
        # In lifecycle mode every state arrives; yield only the chosen ones.
        self._wanted = set(states) if lifecycle else set()
        self._settings = settings
        self._start = start
        self._window = window
        self._skip_duplicates = skip_duplicates
        self._max_batch = max_batch
        self._poll_timeout_ms = int(poll_timeout * 1000)
        self._consumer_options = dict(consumer_options or {})
        self._memory = EventMemory(window)
        self._consumer: Any = None
        self._buffer: deque[Any] = deque()
        self._current: GenerationEvent | None = None
        self._handled: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._warm_until: dict[TopicPartition, int] = {}
        self.malformed = 0  # records skipped because the bridge cannot have written them

    async def start(self) -> None:
        """Connect and join the group. Raises aiokafka's `KafkaError` when Kafka is unreachable."""
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            **{
                **consumer_options(self._settings, "consumer"),
                "group_id": self.group_id,
                "auto_offset_reset": self._start,
                **self._consumer_options,
            }
        )
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()  # start() leaves its connections half-open on failure
            raise
        listener = _Rebalance(self) if self.group_id is not None else None
        consumer.subscribe(list(self.topics), listener=listener)
        self._consumer = consumer

    async def stop(self) -> None:
        """Commit what was handled (not the event being handled) and leave. Safe to call twice."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            await self._commit_handled(consumer)
        finally:
            await consumer.stop()

    async def __aenter__(self) -> GenerationConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __aiter__(self) -> GenerationConsumer:
        return self

    async def __anext__(self) -> GenerationEvent:
        """The next event. Asking for it marks the previous one handled.

        Waits until one arrives. Cancelling the wait loses nothing: buffered
        records stay buffered and the previous event stays marked handled.
        """
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("GenerationConsumer is not started")
        self._mark_current_handled()
        while True:
            if not self._buffer:
                await self._commit_handled(consumer)
                await self._fill(consumer)
                continue
            record = self._buffer.popleft()
            event = self._absorb(record)
            if event is None:
                self._mark(record.topic, record.partition, record.offset)
                continue
            self._current = event
            return event

    async def commit(self) -> None:
        """Mark the current event handled and commit every handled offset now."""
        if self._consumer is None:
            raise RuntimeError("GenerationConsumer is not started")
        self._mark_current_handled()
        await self._commit_handled(self._consumer)

    # Internals

    def _absorb(self, record: Any) -> GenerationEvent | None:
        """Remember a live record; the event to yield, or None to skip it."""
        try:
            event = event_from_record(record)
        except MalformedRecord as exc:
            self.malformed += 1
            log.warning(
                "skipping a record the bridge cannot have written",
                extra={
                    "fields": {
                        "topic": record.topic,
                        "partition": record.partition,
                        "offset": record.offset,
                        "error": str(exc),
                    }
                },
            )
            return None
        duplicate, furthest = self._memory.observe(
            event.dedupe_key, event.generation_id, event.state
        )
        if duplicate and self._skip_duplicates:
            return None
        if self._wanted and event.state not in self._wanted:
            return None
        if duplicate or furthest:
            event = replace(
                event, stale=furthest is not None, furthest_state=furthest, duplicate=duplicate
            )
        return event

    def _recall(self, record: Any) -> None:
        """Remember an already-handled record read back at assignment."""
        try:
            event = event_from_record(record)
        except MalformedRecord:
            return
        self._memory.observe(event.dedupe_key, event.generation_id, event.state)

    def _mark(self, topic: str, partition: int, offset: int) -> None:
        self._handled[TopicPartition(topic, partition)] = offset + 1

    def _mark_current_handled(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            self._mark(current.topic, current.partition, current.offset)

    async def _fill(self, consumer: Any) -> None:
        """Fetch the next batch, first finishing any read-back of handled records.

        The read-back is set up by the rebalance listener, which runs inside a
        fetch: so any fetch may start one, and live records wait until it is done.
        """
        while True:
            warming = list(self._warm_until)
            if warming:
                batch = await consumer.getmany(*warming, timeout_ms=self._poll_timeout_ms)
            else:
                batch = await consumer.getmany(
                    timeout_ms=self._poll_timeout_ms, max_records=self._max_batch
                )
            for tp, records in batch.items():
                until = self._warm_until.get(tp)
                for record in records:
                    if until is not None and record.offset < until:
                        self._recall(record)
                    else:
                        self._buffer.append(record)
            for tp in list(self._warm_until):
                if await self._position(consumer, tp) >= self._warm_until[tp]:
                    del self._warm_until[tp]
            if not self._warm_until and (self._buffer or not warming):
                return

    @staticmethod
    async def _position(consumer: Any, tp: TopicPartition) -> int:
        try:
            return int(await consumer.position(tp))
        except IllegalStateError:
            return 1 << 62  # no longer assigned: nothing to read back

    async def _commit_handled(self, consumer: Any) -> None:
        if self.group_id is None:
            return
        assigned = consumer.assignment()
        pending = {
            tp: offset
            for tp, offset in self._handled.items()
            if tp in assigned and self._committed.get(tp) != offset
        }
        if not pending:
            return
        try:
            await consumer.commit(pending)
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took the partitions: their new owner reads these records again.
            log.warning("commit failed; records will be delivered again", exc_info=exc)
            return
        except KafkaError as exc:
            log.warning("commit failed; records will be delivered again", exc_info=exc)
            return
        self._committed.update(pending)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is not None:
            await self._commit_handled(consumer)
        if self._current is not None and (
            TopicPartition(self._current.topic, self._current.partition) in revoked
        ):
            self._current = None  # its partition moved: the new owner delivers it again
        self._buffer = deque(
            record
            for record in self._buffer
            if TopicPartition(record.topic, record.partition) not in revoked
        )
        for tp in revoked:
            self._handled.pop(tp, None)
            self._committed.pop(tp, None)
            self._warm_until.pop(tp, None)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None or self._window == 0:
            return
        for tp in assigned:
            committed = await consumer.committed(tp)
            if committed is None or committed <= 0:
                continue
            self._committed[tp] = committed
            beginning = (await consumer.beginning_offsets([tp]))[tp]
            first = max(beginning, committed - self._window)
            if first < committed:
                consumer.seek(tp, first)
                self._warm_until[tp] = committed
