"""The Kafka side: a small `Publisher` protocol and the aiokafka producer behind it.

Kafka's many errors become one of the bridge's own (`KafkaUnavailable`), so the
layers above only need to know "acknowledged in time" or "not".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2
from prometheus_client import Histogram

from bridge.ops.metrics import Metrics
from bridge.settings import Settings, security_options

log = logging.getLogger("bridge.delivery.publisher")

# Room for headers and batch framing on top of the largest accepted body.
_RECORD_OVERHEAD_BYTES = 64 * 1024


class RetryCounter(logging.Filter):
    """Counts the producer's retries from aiokafka's own retry warnings.

    aiokafka retries retriable produce errors internally and exposes no counter or
    hook for them; its sender logs one warning per retried request or batch. The
    messages are matched by their fixed openings, tested against the installed
    aiokafka so an upgrade that rewords them fails a test rather than the metric.
    """

    LOGGER = "aiokafka.producer.sender"
    OPENINGS = ("Got error produce response", "Cannot send", "Could not send")

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._retries = metrics.produce_retries

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith(self.OPENINGS):
            self._retries.inc()
        return True


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
    """Kafka did not acknowledge in time, or refused; the caller may retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # a short closed-set label: timeout, or a Kafka error class name


class Publisher(Protocol):
    """Writes records and returns once every one is acknowledged, or raises `KafkaUnavailable`."""

    async def publish(self, records: Sequence[Record], ack_timeout: float) -> list[Placement]:
        """Write `records`; all are acknowledged when this returns.

        Raises `KafkaUnavailable` when not all are acknowledged within `ack_timeout`
        seconds. Records may still land later: delivery is at-least-once.
        """
        ...

    async def check_connection(self, within: float) -> bool:
        """True when the cluster answered a metadata request within `within` seconds."""
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
    """`Publisher` on an `AIOKafkaProducer`. Use `async with` or `start()`/`stop()`."""

    def __init__(self, settings: Settings, *, metrics: Metrics) -> None:
        self._options = producer_options(settings)
        self._metrics = metrics
        self._started = False
        self._producer: AIOKafkaProducer | None = None
        self._produce_timers: dict[str, Histogram] = {}
        self._retry_counter = RetryCounter(metrics)

    async def start(self) -> None:
        """Connect to the cluster; raises `KafkaUnavailable` when it cannot be reached."""
        # Made here, not in __init__: aiokafka warns about producers never started.
        self._producer = AIOKafkaProducer(**self._options)
        try:
            await self._producer.start()
        except KafkaError as exc:
            # start() leaves its connections half-open on failure.
            await self._producer.stop()
            raise KafkaUnavailable(type(exc).__name__) from exc
        self._started = True
        logging.getLogger(RetryCounter.LOGGER).addFilter(self._retry_counter)

    @property
    def connected(self) -> bool:
        """Started and not stopped (the cluster may still be unreachable meanwhile)."""
        return self._started

    async def stop(self) -> None:
        """Flush what is buffered and disconnect. Safe to call twice."""
        if self._started and self._producer is not None:
            logging.getLogger(RetryCounter.LOGGER).removeFilter(self._retry_counter)
            self._started = False
            await self._producer.stop()

    async def __aenter__(self) -> KafkaPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def publish(self, records: Sequence[Record], ack_timeout: float) -> list[Placement]:
        producer = self._producer
        if producer is None or not self._started:
            raise self._failed("not_connected")
        deadline = time.monotonic() + ack_timeout
        started = time.perf_counter()
        try:
            async with asyncio.timeout(ack_timeout):
                # send() only waits when metadata is missing or the buffer is full.
                pending = [
                    await producer.send(r.topic, r.value, key=r.key, headers=r.headers)
                    for r in records
                ]
        except TimeoutError:
            raise self._failed("timeout") from None
        except KafkaError as exc:
            raise self._failed(type(exc).__name__) from exc
        # wait() rather than a timeout around gather(): cancelling aiokafka's futures
        # would not unsend the records, and their late results are still wanted.
        _, not_done = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if not_done:
            raise self._failed("timeout")
        placements = []
        for record, future in zip(records, pending, strict=True):
            error = future.exception()
            if error is not None:
                raise self._failed(type(error).__name__) from error
            metadata = future.result()
            placements.append(Placement(record.topic, metadata.partition, metadata.offset))
        elapsed = time.perf_counter() - started
        for record in records:
            self._produce_timer(record.topic).observe(elapsed)
        return placements

    def _produce_timer(self, topic: str) -> Histogram:
        timer = self._produce_timers.get(topic)
        if timer is None:
            timer = self._produce_timers[topic] = self._metrics.produce_duration.labels(topic=topic)
        return timer

    def _failed(self, reason: str) -> KafkaUnavailable:
        self._metrics.produce_errors.labels(reason=reason).inc()
        return KafkaUnavailable(reason)

    async def check_connection(self, within: float) -> bool:
        if self._producer is None or not self._started:
            return False
        try:
            async with asyncio.timeout(within):
                await self._producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError):
            return False
        return True
