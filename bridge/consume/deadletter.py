"""Replaying dead letters once their cause is fixed: `luma-kafka-bridge deadletter replay`.

Each letter on `{prefix}.deadletter` goes through the same `Pipeline` as a fresh
callback, received at the time in its `luma-received-at` header, so a letter
that is valid now becomes exactly the records (key, value, headers, topics)
that callback would have become then; its event id is the same on every replay.

A topic is append-only, so "leaving what still fails in place" is done with
offsets: replay reads the letters from its consumer group's committed offset
up to the end it saw when it started, and commits past each one it has dealt
with. A letter that is still invalid is written again to the dead-letter topic
by the pipeline (same raw body, original `luma-received-at`, today's
`luma-error`), so it stays on the dead-letter topic for the next replay, while
letters that were routed are never routed twice. If Kafka stops acknowledging,
replay stops before that letter and commits nothing past it.

Letters the reconciler wrote because Luma's API does not know a generation
(`luma-error` is `RECONCILE_NOT_FOUND_ERROR`) hold no callback to replay: they are
counted as `left_alone` and stay where they are.

Run one replay at a time: partitions are assigned by hand, not shared by a group.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from bridge.contract.callback import (
    RECONCILE_NOT_FOUND_ERROR,
    InvalidCallback,
    Topics,
    parse_callback,
    parse_timestamp,
)
from bridge.delivery.dedupe import DedupeWindow
from bridge.delivery.pipeline import Outcome, Pipeline
from bridge.delivery.publisher import KafkaPublisher
from bridge.delivery.verification import CallbackVerifier
from bridge.ops.metrics import Metrics
from bridge.settings import Settings, consumer_options

log = logging.getLogger("bridge.consume.deadletter")

ERROR_HEADER = "luma-error"
RECEIVED_AT_HEADER = "luma-received-at"
COMMIT_EVERY = 100


class ReplayInterrupted(Exception):
    """Kafka stopped acknowledging; what was replayed before is committed."""

    def __init__(self, reason: str, summary: ReplaySummary) -> None:
        super().__init__(reason)
        self.reason = reason
        self.summary = summary


@dataclass
class ReplaySummary:
    """What a replay did, letter by letter."""

    examined: int = 0
    routed: int = 0
    duplicates: int = 0
    still_failing: int = 0
    left_alone: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "examined": self.examined,
            "routed": self.routed,
            "duplicates": self.duplicates,
            "still_failing": self.still_failing,
            "left_alone": self.left_alone,
            "reasons": dict(self.reasons),
            "dry_run": self.dry_run,
        }

    def report(self) -> str:
        verb = "would route" if self.dry_run else "routed"
        lines = [
            f"examined {self.examined} dead letters: {verb} {self.routed}, "
            f"{self.duplicates} duplicates, {self.still_failing} still failing"
            + (
                f", {self.left_alone} left alone (not found in Luma's API)"
                if self.left_alone
                else ""
            )
        ]
        lines.extend(f"  {count:5}  {reason}" for reason, count in self.reasons.most_common())
        return "\n".join(lines)


def default_group(settings: Settings) -> str:
    return f"{settings.kafka_client_id}-deadletter-replay"


def _header(record: Any, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode("utf-8", "replace")
    return None


def received_at_of(record: Any) -> datetime:
    """The letter's `luma-received-at`, else its Kafka timestamp."""
    for name, value in record.headers or ():
        if name == RECEIVED_AT_HEADER:
            try:
                return parse_timestamp(value.decode())
            except (UnicodeDecodeError, ValueError):
                break
    return datetime.fromtimestamp(record.timestamp / 1000, tz=UTC)


async def replay_dead_letters(
    settings: Settings,
    *,
    group_id: str | None = None,
    dry_run: bool = False,
    verifier: CallbackVerifier | None = None,
) -> ReplaySummary:
    """Route every dead letter that is valid now; keep the others on the dead-letter topic.

    With a `verifier` (VERIFY `tag` or `enforce`), a letter is checked against Luma's API as
    a live callback is, and written or refused on the same terms.

    Reads from `group_id`'s committed offsets (default `default_group(settings)`)
    to the end seen at start. With `dry_run`, publishes and commits nothing.
    Raises `ReplayInterrupted` when Kafka stops acknowledging, aiokafka's
    `KafkaError` when it cannot be reached at all.
    """
    topics = Topics(settings.topic_prefix)
    summary = ReplaySummary(dry_run=dry_run)
    consumer = AIOKafkaConsumer(
        group_id=group_id or default_group(settings),
        auto_offset_reset="earliest",
        **consumer_options(settings, "deadletter-replay"),
    )
    publisher = KafkaPublisher(settings, metrics=Metrics(CollectorRegistry()))
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()  # start() leaves its connections half-open on failure
        raise
    try:
        if not dry_run:
            await publisher.start()
        pipeline = Pipeline(
            publisher=publisher,
            topics=topics,
            metrics=Metrics(CollectorRegistry()),
            ack_timeout=settings.kafka_ack_timeout,
            lifecycle=settings.lifecycle_topic,
            dedupe=DedupeWindow(
                size=settings.dedupe_window_size, ttl=settings.dedupe_window_seconds
            ),
            cloudevents=settings.cloudevents_options(),
            verifier=verifier,
        )
        await _replay(consumer, pipeline, topics, summary, dry_run=dry_run)
    finally:
        await publisher.stop()
        await consumer.stop()
    return summary


async def _replay(
    consumer: Any, pipeline: Pipeline, topics: Topics, summary: ReplaySummary, *, dry_run: bool
) -> None:
    # consumer.topics() would fill a throwaway copy of the metadata, and the consumer's own
    # lists only what it asked for: all topics on Tansu, none on Apache Kafka. So ask.
    cluster = await consumer._client.fetch_all_metadata()
    partitions = sorted(cluster.partitions_for_topic(topics.deadletter) or ())
    assigned = [TopicPartition(topics.deadletter, partition) for partition in partitions]
    if not assigned:
        return
    consumer.assign(assigned)
    ends = await consumer.end_offsets(assigned)
    for tp in assigned:
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
    done: dict[TopicPartition, int] = {}
    remaining = {tp for tp in assigned if await consumer.position(tp) < ends[tp]}
    try:
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break  # written after replay started, maybe by replay itself
                    await _replay_one(record, pipeline, summary, dry_run=dry_run)
                    done[tp] = record.offset + 1
                    if not dry_run and summary.examined % COMMIT_EVERY == 0:
                        await consumer.commit(done)
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    finally:
        if done and not dry_run:
            await consumer.commit(done)


async def _replay_one(
    record: Any, pipeline: Pipeline, summary: ReplaySummary, *, dry_run: bool
) -> None:
    if _header(record, ERROR_HEADER) == RECONCILE_NOT_FOUND_ERROR:
        summary.left_alone += 1  # the reconciler's note, not a callback: nothing to replay
        return
    body: bytes = record.value or b""
    received_at = received_at_of(record)
    if dry_run:
        summary.examined += 1
        try:
            parse_callback(body)
        except InvalidCallback as exc:
            summary.still_failing += 1
            summary.reasons[exc.reason] += 1
        else:
            summary.routed += 1
        return
    result = await pipeline.handle(body, received_at)
    if result.outcome is Outcome.UNAVAILABLE:
        raise ReplayInterrupted(result.reason, summary)
    summary.examined += 1
    if result.outcome is Outcome.ACCEPTED:
        summary.routed += 1
    elif result.outcome is Outcome.DUPLICATE:
        summary.duplicates += 1
    else:
        summary.still_failing += 1
        summary.reasons[result.reason] += 1
    log.info(
        "dead letter replayed",
        extra={
            "fields": {
                "partition": record.partition,
                "offset": record.offset,
                "outcome": str(result.outcome),
            }
        },
    )


async def replay_command(
    settings: Settings,
    *,
    group_id: str | None,
    dry_run: bool,
    as_json: bool,
    out: TextIO = sys.stdout,
    verifier: CallbackVerifier | None = None,
) -> int:
    """`luma-kafka-bridge deadletter replay`: 0 when every letter was dealt with, else 1."""
    try:
        summary = await replay_dead_letters(
            settings, group_id=group_id, dry_run=dry_run, verifier=verifier
        )
    except ReplayInterrupted as exc:
        print(
            f"luma-kafka-bridge: replay stopped, Kafka did not acknowledge ({exc.reason}); "
            "what was replayed before is committed, run it again later",
            file=sys.stderr,
        )
        summary, code = exc.summary, 1
    except KafkaError as exc:
        print(
            f"luma-kafka-bridge: cannot replay from {settings.kafka_bootstrap_servers}: {exc!r}",
            file=sys.stderr,
        )
        return 1
    else:
        code = 0
    out.write((json.dumps(summary.as_dict()) if as_json else summary.report()) + "\n")
    return code
