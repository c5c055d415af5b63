"""Transition identity and the CloudEvents attributes, as pure functions.

That the official SDK reads real records back is in tests/integration/test_cloudevents.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from bridge.contract.callback import (
    DEFAULT_CLOUDEVENTS_SOURCE,
    CloudEvents,
    parse_callback,
    record_headers,
    transition_id,
)
from tests.helpers import SEED_COMPLETED_VIDEO

RECEIVED = datetime(2026, 5, 30, 12, 35, 0, 250_000, tzinfo=UTC)


def test_the_transition_id_ignores_what_differs_between_a_callback_and_an_api_read() -> None:
    from_callback = parse_callback(json.dumps(SEED_COMPLETED_VIDEO).encode())
    # An API read of the same moment: other members, another order, the assets re-ordered.
    api_read = {
        "request": {"prompt": "other"},
        "assets": dict(reversed(list(SEED_COMPLETED_VIDEO["assets"].items()))),
        "state": "completed",
        "id": SEED_COMPLETED_VIDEO["id"],
        "model": "ray-2",
    }
    from_api = parse_callback(json.dumps(api_read).encode())
    assert from_callback.event_id != from_api.event_id
    assert from_callback.transition_id == from_api.transition_id
    assert from_callback.transition_id == transition_id(
        SEED_COMPLETED_VIDEO["id"], "completed", SEED_COMPLETED_VIDEO["assets"]
    )


def test_progress_within_one_state_is_a_new_transition() -> None:
    base = {"id": "g1", "state": "dreaming"}
    first = parse_callback(json.dumps({**base, "assets": None}).encode())
    progress = parse_callback(
        json.dumps({**base, "assets": {"progress_video": "https://cdn/p1.mp4"}}).encode()
    )
    later = parse_callback(
        json.dumps({**base, "assets": {"progress_video": "https://cdn/p2.mp4"}}).encode()
    )
    assert len({first.transition_id, progress.transition_id, later.transition_id}) == 3
    assert len(first.transition_id) == 32
    # A missing `assets` and `assets: null` are the same moment.
    assert parse_callback(json.dumps(base).encode()).transition_id == first.transition_id


def test_records_carry_the_cloudevents_attributes_in_binary_mode() -> None:
    callback = parse_callback(json.dumps(SEED_COMPLETED_VIDEO).encode())
    headers = dict(record_headers(callback, RECEIVED))
    assert {name: value for name, value in headers.items() if name.startswith("ce_")} == {
        "ce_specversion": b"1.0",
        "ce_id": callback.transition_id.encode(),
        "ce_source": DEFAULT_CLOUDEVENTS_SOURCE.encode(),
        "ce_type": b"ai.lumalabs.generation.completed",
        "ce_subject": SEED_COMPLETED_VIDEO["id"].encode(),
        "ce_time": b"2026-05-30T12:35:00.250Z",
    }
    assert headers["content-type"] == b"application/json"
    assert headers["luma-transition-id"] == headers["ce_id"]


def test_the_switch_leaves_only_the_luma_headers() -> None:
    callback = parse_callback(json.dumps(SEED_COMPLETED_VIDEO).encode())
    off = dict(record_headers(callback, RECEIVED, cloudevents=CloudEvents(enabled=False)))
    assert not [name for name in off if name.startswith("ce_")]
    assert off["luma-transition-id"] == callback.transition_id.encode()
    custom = dict(
        record_headers(callback, RECEIVED, cloudevents=CloudEvents(source="urn:example:luma"))
    )
    assert custom["ce_source"] == b"urn:example:luma"


def test_assets_beyond_what_orjson_encodes_still_get_a_stable_transition_id() -> None:
    """A 128-bit integer among the assets is valid JSON; it must not turn into a 503 loop."""
    body = b'{"id":"g","state":"queued","assets":{"n":123456789012345678901234567890}}'
    first, again = parse_callback(body), parse_callback(body)
    assert len(first.transition_id) == 32
    assert first.transition_id == again.transition_id
    other = body.replace(b"1234567890}", b"1234567891}")
    assert parse_callback(other).transition_id != first.transition_id
