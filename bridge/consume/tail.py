"""`luma-kafka-bridge tail`: follow generation topics and print one line per event.

Readable lines for people (time, state, generation id, type, model, asset URL or
failure reason) or JSON lines for `jq` and other programs. Built on
`bridge.consume.consumer.GenerationConsumer`, so stale states are marked as such;
duplicates are shown, marked, rather than hidden, since tail is for looking.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka.errors import KafkaError

from bridge.consume.consumer import GenerationConsumer, GenerationEvent
from bridge.contract.callback import rfc3339
from bridge.settings import Settings


@dataclass(frozen=True, slots=True)
class TailOptions:
    """What to follow and how to print it."""

    states: tuple[str, ...] = ()
    lifecycle: bool = False
    from_beginning: bool = False
    as_json: bool = False
    max_events: int | None = None
    group_id: str | None = None


def format_line(event: GenerationEvent) -> str:
    """`time  state  id  type  model  asset-or-reason`, `-` for what is missing."""
    detail = event.failure_reason if event.state == "failed" else event.asset_url
    fields = [
        rfc3339(event.received_at),
        f"{event.state:<9}",
        event.generation_id,
        event.generation_type or "-",
        event.model or "-",
        detail or event.failure_reason or "-",
    ]
    line = "  ".join(fields)
    if event.stale:
        line += f"  (stale: already {event.furthest_state})"
    if event.duplicate:
        line += "  (duplicate)"
    return line


def as_json(event: GenerationEvent) -> dict[str, Any]:
    """The event as a JSON object; `generation` holds the members as received."""
    return {
        "received_at": rfc3339(event.received_at),
        "state": event.state,
        "generation_id": event.generation_id,
        "generation_type": event.generation_type,
        "model": event.model,
        "asset_url": event.asset_url,
        "failure_reason": event.failure_reason,
        "event_id": event.event_id,
        "stale": event.stale,
        "furthest_state": event.furthest_state,
        "duplicate": event.duplicate,
        "topic": event.topic,
        "partition": event.partition,
        "offset": event.offset,
        "generation": event.generation.model_dump(mode="json", exclude_unset=True),
    }


def written_before(event: GenerationEvent, moment: datetime) -> bool:
    """Whether the record was in Kafka before `moment`, by its timestamp.

    Without `--from-beginning` a consumer starts at the end offset its broker names.
    The embedded broker (Tansu) names the offset after the *first* record of the last
    batch rather than after the batch, so the batch's other records, old ones, would
    be printed first. Records written before tail started are skipped instead; the
    bridge's producer stamps each record when it sends it (a spooled callback when it
    is drained), so this hides only what was already there, give or take the clock
    difference between the bridge's host and tail's.
    """
    return event.written_at is not None and event.written_at < moment


async def tail(
    settings: Settings,
    options: TailOptions,
    out: TextIO,
    *,
    consumer_options: Mapping[str, Any] | None = None,
) -> int:
    """Print events until `max_events` were printed (or forever); returns how many.

    Follows the lifecycle topic when `options.lifecycle` or no state is chosen
    (and the bridge writes it), else the chosen states' topics.
    """
    lifecycle = options.lifecycle or (not options.states and settings.lifecycle_topic)
    states = options.states or (
        () if lifecycle else ("queued", "dreaming", "completed", "failed", "unknown")
    )
    printed = 0
    # Kafka timestamps are in milliseconds: compare at that precision.
    now = datetime.now(UTC)
    started = now.replace(microsecond=now.microsecond // 1000 * 1000)
    only_new = not options.from_beginning and options.group_id is None
    async with GenerationConsumer(
        group_id=options.group_id,
        states=states,
        lifecycle=lifecycle,
        settings=settings,
        start="earliest" if options.from_beginning else "latest",
        skip_duplicates=False,
        consumer_options=consumer_options,
    ) as events:
        print(
            f"following {', '.join(events.topics)}"
            + ("" if options.from_beginning else " (new events only; --from-beginning for all)")
            + "; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        async for event in events:
            if only_new and written_before(event, started):
                continue
            line = (
                json.dumps(as_json(event), ensure_ascii=False)
                if options.as_json
                else format_line(event)
            )
            out.write(line + "\n")
            out.flush()
            printed += 1
            if options.max_events is not None and printed >= options.max_events:
                await events.commit()
                break
    return printed


async def tail_command(settings: Settings, options: TailOptions, out: TextIO = sys.stdout) -> int:
    """`luma-kafka-bridge tail`: exit 0 after `max_events`, 1 when Kafka cannot be read."""
    try:
        await tail(settings, options, out)
    except KafkaError as exc:
        print(
            f"luma-kafka-bridge: cannot read from {settings.kafka_bootstrap_servers}: {exc!r}; "
            "check --kafka-bootstrap-servers (LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS) and that "
            "the brokers are up",
            file=sys.stderr,
        )
        return 1
    return 0
