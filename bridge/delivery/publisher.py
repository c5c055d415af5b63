"""The Kafka side: a small `Publisher` protocol and the aiokafka producer behind it.

`send()` hands records to aiokafka and returns a future per record; `classify` sorts
Kafka's many errors into the four things the layers above can do about them
(retry, move the record aside, wait for an operator, renew the producer).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Coroutine, Generator, Sequence
from typing import Any, NamedTuple, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as Errors
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2
from prometheus_client import Histogram

from bridge.delivery.pacing import pace_metadata_updates
from bridge.ops.logs import RepeatedLines
from bridge.ops.metrics import Metrics
from bridge.settings import Settings, consumer_options, security_options

log = logging.getLogger("bridge.delivery.publisher")

# Room for headers and batch framing on top of the largest accepted body.
_RECORD_OVERHEAD_BYTES = 64 * 1024


class RetryCounter(logging.Filter):
    """Counts the producer's retries from aiokafka's own retry warnings, then lets the
    sender's lines through as `RepeatedLines` does (once per window for each kind).

    aiokafka retries retriable produce errors internally and exposes no counter or
    hook for them; its sender logs one warning per retried request or batch. The
    messages are matched by their fixed openings, tested against the installed
    aiokafka so an upgrade that rewords them fails a test rather than the metric.
    Every retry is counted, including those whose line is held back.
    """

    LOGGER = "aiokafka.producer.sender"
    OPENINGS = ("Got error produce response", "Cannot send", "Could not send")

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._retries = metrics.produce_retries
        self._repeats = RepeatedLines()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith(self.OPENINGS):
            self._retries.inc()
        return self._repeats.filter(record)


class Record(NamedTuple):
    """One Kafka record to write."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class Placement(NamedTuple):
    """Where Kafka put an acknowledged record."""

    topic: str
    partition: int
    offset: int


class KafkaUnavailable(Exception):
    """Kafka cannot be reached; the caller may retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # a short closed-set label: timeout, or a Kafka error class name


class NotConnected(KafkaError):  # type: ignore[misc]  # aiokafka ships no type stubs
    """The producer is not started (Kafka was unreachable at start-up), or was replaced."""

    retriable = True


class Failure(enum.Enum):
    """What a failed send means for the record, decided from the error alone.

    RETRY: the same record may succeed later (outage, leader change, timeout).
    RECORD: Kafka refuses this record for good (too large, invalid, corrupt); retrying
      it would block everything behind it, so it is moved aside.
    TOPIC: the topic or the client is refused (authorization, a topic that does not
      exist, a policy); no record is at fault, so nothing is moved aside: the rows wait
      and an operator must act.
    PRODUCER: the producer itself is unusable (idempotence sequence or epoch lost); a
      new one must be made, then the record is retried.
    """

    RETRY = "retry"
    RECORD = "record"
    TOPIC = "topic"
    PRODUCER = "producer"


_RECORD_ERRORS: tuple[type[BaseException], ...] = (
    Errors.MessageSizeTooLargeError,
    Errors.RecordTooLargeError,
    Errors.RecordListTooLargeError,
    Errors.CorruptRecordException,
    Errors.InvalidTimestampError,
    Errors.UnsupportedForMessageFormatError,
)
_PRODUCER_ERRORS: tuple[type[BaseException], ...] = (
    Errors.OutOfOrderSequenceNumber,
    Errors.ProducerFenced,
    Errors.InvalidProducerEpoch,
    Errors.InvalidProducerIdMapping,
    Errors.InvalidTxnState,
    Errors.ProducerClosed,
    Errors.IllegalStateError,
)
_TOPIC_ERRORS: tuple[type[BaseException], ...] = (
    Errors.TopicAuthorizationFailedError,
    Errors.ClusterAuthorizationFailedError,
    Errors.UnknownTopicOrPartitionError,
    Errors.InvalidTopicError,
    Errors.PolicyViolationError,
)


_RETRY_ERRORS: tuple[type[BaseException], ...] = (
    # Not marked retriable by aiokafka, but only ever a matter of time.
    Errors.KafkaTimeoutError,
)


def classify(error: BaseException) -> Failure:
    """What `error`, the outcome of one send, means for its record (see `Failure`)."""
    if isinstance(error, _RETRY_ERRORS):
        return Failure.RETRY
    if isinstance(error, _RECORD_ERRORS):
        return Failure.RECORD
    if isinstance(error, _PRODUCER_ERRORS):
        return Failure.PRODUCER
    if isinstance(error, _TOPIC_ERRORS):
        return Failure.TOPIC
    if isinstance(error, KafkaError) and not error.retriable:
        # aiokafka's own "Unexpected error during batch delivery" ends its sender task:
        # that producer will never deliver again.
        return Failure.PRODUCER if type(error) is KafkaError else Failure.TOPIC
    return Failure.RETRY


def may_have_landed(error: BaseException) -> bool:
    """False only when the failed record never reached Kafka; otherwise a send whose
    answer never came (a timeout, a dropped connection, a closed producer) may still have
    been appended, and sending it again without looking first could write it twice."""
    return not isinstance(error, NotConnected)


def failure_reason(error: BaseException) -> str:
    """A short closed-set label for logs and metrics: the error's class name."""
    return type(error).__name__


class Publisher(Protocol):
    """Hands records to Kafka; one future per record says how it ended."""

    def send(self, records: Sequence[Record]) -> list[asyncio.Future[Placement]]:
        """Hand `records` to the producer, in this order, and return at once.

        Each future resolves with the record's placement once Kafka acknowledged it, or
        with the error that ended it (see `classify`). Every future resolves eventually:
        a producer that is stopped or replaced fails what it still holds. Cancelling a
        future does not unsend its record.
        """
        ...

    async def publish(self, records: Sequence[Record], ack_timeout: float) -> list[Placement]:
        """Send `records` and wait for all of them; `KafkaUnavailable` when not acknowledged
        within `ack_timeout` (they may still land). For writers outside the ordered path
        (the reconciler), which keep their own order."""
        ...

    async def check_connection(self, within: float) -> bool:
        """True when the cluster answered a metadata request within `within` seconds."""
        ...

    async def find(self, records: Sequence[Record], since_ms: int, within: float) -> list[bool]:
        """For each of `records`, whether its partition already holds an identical record
        (same key, value and headers) written at or after `since_ms` (epoch ms). Raises
        `KafkaUnavailable` when the partitions cannot be read to their end within `within`
        seconds."""
        ...

    async def renew(self) -> None:
        """Replace an unusable producer (after a `Failure.PRODUCER` error) with a new one."""
        ...


@functools.lru_cache(maxsize=65536)
def _key_hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


def keyed_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default (Java-compatible murmur2) partitioning, with the hash cached.

    The pure-Python murmur2 is a visible share of the CPU per callback, and the same
    generation id is hashed for both of its records and for each of its states.
    """
    if key is None:
        return int(DefaultPartitioner()(key, all_partitions, available))
    return all_partitions[_key_hash(key) % len(all_partitions)]


def producer_options(settings: Settings) -> dict[str, Any]:
    """aiokafka producer keyword arguments for `settings` (acks=all always)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": settings.kafka_client_id,
        "acks": "all",
        "enable_idempotence": settings.kafka_enable_idempotence,
        "compression_type": None
        if settings.kafka_compression_type == "none"
        else settings.kafka_compression_type,
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_size,
        "max_request_size": settings.max_body_bytes + _RECORD_OVERHEAD_BYTES,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "partitioner": keyed_partitioner,
    }
    options.update(security_options(settings))
    return options


class KafkaPublisher:
    """`Publisher` on an `AIOKafkaProducer`. Use `async with` or `start()`/`stop()`.

    aiokafka keeps a partition's batches in order and sends one at a time, so records
    handed to one producer in order land in order, retries included, as long as none
    fails for good; the layer above never hands a generation's next record before the
    previous one ended.
    """

    def __init__(self, settings: Settings, *, metrics: Metrics) -> None:
        self._options = producer_options(settings)
        self._lookup_options = consumer_options(settings, "lookup")
        self._metrics = metrics
        self._started = False
        self._producer: AIOKafkaProducer | None = None
        self._produce_timers: dict[str, Histogram] = {}
        self._retry_counter = RetryCounter(metrics)
        # Futures handed out and not yet resolved: a producer that is stopped or
        # replaced may leave aiokafka's own futures pending forever, so ours are failed.
        self._outstanding: set[asyncio.Future[Placement]] = set()
        self._handing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect to the cluster; raises `KafkaUnavailable` when it cannot be reached, or
        when the producer is not ready within the request timeout."""
        # Made here, not in __init__: aiokafka warns about producers never started.
        producer = AIOKafkaProducer(**self._options)
        pace_metadata_updates(producer.client)
        try:
            # An idempotent producer's start() asks for a producer id until it gets one,
            # silently: after a whole-cluster restart that once took for ever. Bounded, the
            # caller tries again with a new producer, which may ask another broker.
            async with asyncio.timeout(self._options["request_timeout_ms"] / 1000):
                await producer.start()
        except KafkaError as exc:
            # start() leaves its connections half-open on failure.
            await producer.stop()
            raise KafkaUnavailable(type(exc).__name__) from exc
        except TimeoutError:
            log.warning(
                "the Kafka producer did not start within the request timeout (no metadata, "
                "or no producer id for idempotence); retrying with a new one"
            )
            # Its sender never started, so nothing is flushed: stop() closes the connections
            # and marks it closed (else aiokafka logs "Unclosed AIOKafkaProducer" at ERROR).
            await producer.stop()
            raise KafkaUnavailable("start_timeout") from None
        self._producer = producer
        if not self._started:
            logging.getLogger(RetryCounter.LOGGER).addFilter(self._retry_counter)
        self._started = True

    @property
    def connected(self) -> bool:
        """Started and not stopped (the cluster may still be unreachable meanwhile)."""
        return self._started

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a flush bound, not a call timeout
        """Flush what is buffered and disconnect, within `timeout` seconds. Safe to call twice.

        When the flush does not finish in time (Kafka unreachable), the producer is
        abandoned and every record it still holds is failed with `ProducerClosed`: the
        caller keeps those in the spool for the next start.
        """
        if not self._started:
            return
        logging.getLogger(RetryCounter.LOGGER).removeFilter(self._retry_counter)
        self._started = False
        producer, self._producer = self._producer, None
        if producer is not None:  # None after a renewal that could not start a new one
            await self._close(producer, timeout)

    async def renew(self) -> None:
        """Replace the producer: close the old one at once and start a new one."""
        old = self._producer
        self._producer = None
        if old is not None:
            log.warning("renewing the Kafka producer after an error that left it unusable")
            await self._close(old, timeout=0)
        self._metrics.producer_renewals.inc()
        await self.start()

    async def _close(self, producer: AIOKafkaProducer, timeout: float | None) -> None:  # noqa: ASYNC109
        for task in list(self._handing):
            task.cancel()
        if not await stop_producer(producer, timeout):
            log.warning("the Kafka producer did not flush in time; its records stay spooled")
        self._fail_outstanding()

    def _fail_outstanding(self) -> None:
        for future in list(self._outstanding):
            if not future.done():
                future.set_exception(Errors.ProducerClosed())
        self._outstanding.clear()

    async def __aenter__(self) -> KafkaPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def send(self, records: Sequence[Record]) -> list[asyncio.Future[Placement]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Placement]] = [loop.create_future() for _ in records]
        producer = self._producer
        if producer is None or not self._started:
            for future in futures:
                future.set_exception(NotConnected("not_connected"))
            self._count_failures(futures)
            return futures
        self._outstanding.update(futures)
        for future in futures:
            future.add_done_callback(self._outstanding.discard)
        # Handing over may wait (metadata, a full buffer): what is left then runs on its
        # own so the caller's deadline never cancels it half-way, which would unsend records.
        task = run_eagerly(self._hand_over(producer, records, futures))
        if task is not None:
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)
        return futures

    async def _hand_over(
        self,
        producer: AIOKafkaProducer,
        records: Sequence[Record],
        futures: list[asyncio.Future[Placement]],
    ) -> None:
        started = time.perf_counter()
        for record, future in zip(records, futures, strict=True):
            try:
                sent = await producer.send(
                    record.topic, record.value, key=record.key, headers=record.headers
                )
            except asyncio.CancelledError:
                _fail(future, Errors.ProducerClosed())
                continue
            except Exception as exc:
                _fail(future, exc)
                self._count_failure(exc)
                continue
            sent.add_done_callback(
                functools.partial(self._acknowledged, record.topic, future, started)
            )

    def _acknowledged(
        self,
        topic: str,
        future: asyncio.Future[Placement],
        started: float,
        sent: asyncio.Future[Any],
    ) -> None:
        if future.done():
            return
        if sent.cancelled():
            future.set_exception(Errors.ProducerClosed())
            return
        error = sent.exception()
        if error is not None:
            future.set_exception(error)
            self._count_failure(error)
            return
        metadata = sent.result()
        self._produce_timer(topic).observe(time.perf_counter() - started)
        future.set_result(Placement(topic, metadata.partition, metadata.offset))

    async def publish(self, records: Sequence[Record], ack_timeout: float) -> list[Placement]:
        return await wait_all(self.send(records), ack_timeout)

    def _count_failures(self, futures: list[asyncio.Future[Placement]]) -> None:
        for future in futures:
            error = future.exception()
            if error is not None:
                self._count_failure(error)

    def _count_failure(self, error: BaseException) -> None:
        reason = "not_connected" if isinstance(error, NotConnected) else failure_reason(error)
        self._metrics.produce_errors.labels(reason=reason).inc()

    def _produce_timer(self, topic: str) -> Histogram:
        timer = self._produce_timers.get(topic)
        if timer is None:
            timer = self._produce_timers[topic] = self._metrics.produce_duration.labels(topic=topic)
        return timer

    async def check_connection(self, within: float) -> bool:
        if self._producer is None or not self._started:
            return False
        try:
            async with asyncio.timeout(within):
                await self._producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError):
            return False
        return True

    async def find(self, records: Sequence[Record], since_ms: int, within: float) -> list[bool]:
        if not records:
            return []
        try:
            async with asyncio.timeout(within):
                return await self._find(records, since_ms)
        except TimeoutError as exc:
            raise KafkaUnavailable("timeout") from exc
        except KafkaError as exc:
            raise KafkaUnavailable(failure_reason(exc)) from exc

    async def _find(self, records: Sequence[Record], since_ms: int) -> list[bool]:
        wanted: dict[tuple[str, bytes | None, bytes, tuple[tuple[str, bytes], ...]], int] = {
            (record.topic, record.key, record.value, tuple(record.headers)): index
            for index, record in enumerate(records)
        }
        producer = self._producer
        if producer is None:
            raise KafkaUnavailable("not_connected")
        # Every partition of the topics, not only the key's: which one the producer chose
        # depends on the partitions it saw then.
        partitions = [
            TopicPartition(topic, partition)
            for topic in {record.topic for record in records}
            for partition in sorted(await producer.partitions_for(topic))
        ]
        found = [False] * len(records)
        consumer = AIOKafkaConsumer(**self._lookup_options)
        try:
            # Inside: a start that fails or outlasts the lookup's bound is closed too.
            await consumer.start()
            remaining = await _seek_to_time(consumer, partitions, since_ms)
            while remaining and not all(found):
                batch = await consumer.getmany(*remaining, timeout_ms=200)
                for tp, messages in batch.items():
                    for message in messages:
                        index = wanted.get(
                            (tp.topic, message.key, message.value, tuple(message.headers))
                        )
                        if index is not None:
                            found[index] = True
                remaining = await _unfinished(consumer, remaining)
        finally:
            await consumer.stop()
        return found


async def _seek_to_time(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], since_ms: int
) -> dict[TopicPartition, int]:
    """Position `consumer` on the first record of each partition at or after `since_ms`;
    the partitions with records from then on, each with its end offset."""
    consumer.assign(partitions)
    starts = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
    ends = await consumer.end_offsets(partitions)
    remaining: dict[TopicPartition, int] = {}
    for tp in partitions:
        start = starts.get(tp)
        if start is not None and start.offset < ends[tp]:
            consumer.seek(tp, start.offset)
            remaining[tp] = ends[tp]
    return remaining


async def _unfinished(
    consumer: AIOKafkaConsumer, remaining: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    # The embedded broker reports a partition's end as its last batch's first offset + 1:
    # reading up to it still reads that whole batch.
    return {tp: end for tp, end in remaining.items() if await consumer.position(tp) < end}


async def settle_within(futures: Sequence[asyncio.Future[Any]], within: float) -> None:
    """Return once every future is done, or after `within` seconds; never cancels them.

    `asyncio.wait(futures, timeout=within)` without its per-call set, task wrapping and
    callback removal from futures already done: it runs twice per callback, and showed
    as 5 % of the bridge's CPU in py-spy.
    """
    pending = [future for future in futures if not future.done()]
    if not pending:
        return
    left = len(pending)
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if not left and not waiter.done():
            waiter.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    timer = loop.call_later(max(0.0, within), _wake, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        if left:
            for future in pending:
                future.remove_done_callback(one_done)


def run_eagerly(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coroutine` at once, up to where it first waits; what is left runs as a task.

    None when it finished without waiting. Handing records to aiokafka almost never
    waits (the metadata is known, the buffer has room), and a task per callback showed
    in profiles (Python 3.12's eager task factory does the same).
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    return asyncio.create_task(_finish(coroutine, waiting_on))


async def _finish(coroutine: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    await _Resumed(coroutine, waiting_on)


class _Resumed:
    """The rest of a coroutine that was started by hand and now waits on `waiting_on`.

    Awaiting it gives the task what the coroutine waits on, then passes the task's
    answers on (a value, or an exception such as a cancellation) until it returns.
    """

    def __init__(self, coroutine: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, None]:
        waiting_on = self._waiting_on
        while True:
            try:
                answer = yield waiting_on
            except BaseException as exc:  # a cancellation too: the coroutine decides
                step = functools.partial(self._coroutine.throw, exc)
            else:
                step = functools.partial(self._coroutine.send, answer)
            try:
                waiting_on = step()
            except StopIteration:
                return


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def wait_all(futures: list[asyncio.Future[Placement]], within: float) -> list[Placement]:
    """The placements of `futures` once all succeeded; `KafkaUnavailable` when one failed or
    they did not all end within `within` seconds (the records may still land)."""
    await settle_within(futures, within)
    if not all(future.done() for future in futures):
        raise KafkaUnavailable("timeout")
    for future in futures:
        error = future.exception()
        if error is not None:
            raise KafkaUnavailable(failure_reason(error)) from error
    return [future.result() for future in futures]


def _fail(future: asyncio.Future[Placement], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def stop_producer(producer: AIOKafkaProducer, timeout: float | None) -> bool:  # noqa: ASYNC109 - a flush bound
    """Flush and stop `producer` within `timeout` seconds (0: at once); False when it could
    not flush in time (Kafka away) and was abandoned, its records unsent."""
    before = asyncio.all_tasks()
    try:
        async with asyncio.timeout(timeout if timeout is None or timeout > 0 else 0.001):
            await producer.stop()
    except TimeoutError:
        await _abandon(producer)
        _cancel_flush(asyncio.all_tasks() - before)
        return False
    return True


def _cancel_flush(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel the flush among `tasks`: aiokafka's `stop()` runs it in a task of its own,
    which outlives a stop cut off by its timeout and waits for good on the records the
    broker never acknowledged (asyncio then logs "Task was destroyed but it is pending!")."""
    for task in tasks:
        if task.get_coro().__qualname__ == "MessageAccumulator.close":  # type: ignore[union-attr]
            task.cancel()


async def _abandon(producer: AIOKafkaProducer) -> None:
    """Close a producer whose flush hangs: its connections first, so that requests waiting on
    an unresponsive broker fail at once, then its sender task; each step briefly."""
    # aiokafka has no public "close without flushing"; these are its own close steps.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(0.25):
            await producer.client.close()
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(0.25):
                await task
