"""The consumer helper's pure parts: memory of events and states, record decoding, tail lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.consume.consumer import STATE_PROGRESS, EventMemory, MalformedRecord, event_from_record
from bridge.consume.tail import as_json, format_line
from bridge.contract.callback import KNOWN_STATES, parse_callback, record_headers
from tests.helpers import SEED_COMPLETED_VIDEO, SEED_FAILED_VIDEO


def record(body: dict[str, Any], **overrides: Any) -> Any:
    callback = parse_callback(json.dumps(body).encode())
    headers = record_headers(callback, datetime(2026, 5, 30, tzinfo=UTC))
    values = {
        "topic": "t",
        "partition": 0,
        "offset": 7,
        "value": callback.value,
        "headers": headers,
    }
    return SimpleNamespace(**{**values, **overrides})


def test_every_known_state_has_a_progress_rank() -> None:
    assert set(STATE_PROGRESS) == set(KNOWN_STATES)


def test_memory_flags_repeats_and_backward_states_only() -> None:
    memory = EventMemory(10)
    assert memory.observe("e1", "g", "queued") == (False, None)
    assert memory.observe("e2", "g", "completed") == (False, None)
    assert memory.observe("e1", "g", "queued") == (True, "completed")
    assert memory.observe("e3", "g", "dreaming") == (False, "completed")
    assert memory.observe("e4", "g", "failed") == (False, None)  # terminal to terminal
    assert memory.observe("e5", "g", "paused") == (False, None)  # unknown: not ranked


def test_memory_is_bounded_and_zero_turns_it_off() -> None:
    memory = EventMemory(2)
    for n in range(3):
        memory.observe(f"e{n}", f"g{n}", "completed")
    assert memory.observe("e0", "g0", "queued") == (False, None)  # forgotten
    off = EventMemory(0)
    off.observe("e", "g", "completed")
    assert off.observe("e", "g", "queued") == (False, None)


def test_records_become_typed_events() -> None:
    event = event_from_record(record(SEED_COMPLETED_VIDEO))
    assert event.generation_id == SEED_COMPLETED_VIDEO["id"]
    assert (event.state, event.model, event.offset) == ("completed", "ray-2", 7)
    assert event.asset_url == SEED_COMPLETED_VIDEO["assets"]["video"]
    assert as_json(event)["generation"] == SEED_COMPLETED_VIDEO


def test_foreign_records_are_refused() -> None:
    with pytest.raises(MalformedRecord, match="luma-event-id"):
        event_from_record(record(SEED_COMPLETED_VIDEO, headers=[]))
    with pytest.raises(MalformedRecord):
        event_from_record(record(SEED_COMPLETED_VIDEO, value=b"not json"))


def test_tail_line_shows_the_failure_reason_for_failed() -> None:
    line = format_line(event_from_record(record(SEED_FAILED_VIDEO)))
    assert line.startswith("2026-05-30T00:00:00.000Z  failed ")
    assert line.endswith(SEED_FAILED_VIDEO["failure_reason"])
