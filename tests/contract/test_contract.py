"""The contract's pure functions: validation, event id, routing, headers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from bridge.contract.callback import (
    InvalidCallback,
    Topics,
    event_id_for,
    parse_callback,
    record_headers,
)
from tests.helpers import SEED_COMPLETED_VIDEO


def encode(document: object) -> bytes:
    return json.dumps(document).encode()


def test_value_is_the_received_object_re_encoded_compactly() -> None:
    body = b'{ "id" : "g1",\n "state": "queued", "zzz": [1, 2.50, "\\u00e9"], "a": {} }'
    callback = parse_callback(body)
    assert callback.value == '{"id":"g1","state":"queued","zzz":[1,2.5,"é"],"a":{}}'.encode()
    assert (callback.generation_id, callback.state) == ("g1", "queued")


def test_event_id_is_deterministic_and_ignores_whitespace() -> None:
    first = parse_callback(encode(SEED_COMPLETED_VIDEO))
    again = parse_callback(json.dumps(SEED_COMPLETED_VIDEO, indent=4).encode())
    changed = parse_callback(encode({**SEED_COMPLETED_VIDEO, "failure_reason": "x"}))
    assert first.event_id == again.event_id
    assert first.event_id != changed.event_id
    assert first.event_id == event_id_for(first.generation_id, first.state, first.value)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"", "json"),
        (b"{", "json"),
        (b"\xff\xfe", "json"),
        (b'{"id":"x","state":"queued","n":NaN}', "json"),
        (b'{"id":"x","state":"queued","n":1e999}', "json"),
        (b'{"id":"x","id":"y","state":"queued"}', "json"),
        (b'{"id":"\\ud800","state":"queued"}', "json"),
        (b"[" * 100_000 + b"]" * 100_000, "json"),
        (b'"just a string"', "shape"),
        (b"[]", "shape"),
        (b'{"state":"queued"}', "schema"),
        (b'{"id":"","state":"queued"}', "schema"),
        (b'{"id":1,"state":"queued"}', "schema"),
        (b'{"id":"x","state":"queued","created_at":"soon"}', "schema"),
        (b'{"id":"x","state":"queued","created_at":1700000000}', "schema"),
        (b'{"id":"x","state":"queued","assets":{"video":5}}', "schema"),
        (b'{"id":"x","state":"queued","request":"prompt"}', "schema"),
        (b'{"id":"x","state":"queued","failure_reason":false}', "schema"),
    ],
)
def test_invalid_bodies_are_refused_with_a_reason_that_does_not_echo_input(
    body: bytes, kind: str
) -> None:
    with pytest.raises(InvalidCallback) as raised:
        parse_callback(body)
    assert raised.value.kind == kind
    assert "soon" not in raised.value.reason
    assert "prompt" not in raised.value.reason


def test_optional_documented_members_may_be_null() -> None:
    body = {"id": "x", "state": "dreaming", "created_at": None, "assets": None, "request": None}
    assert parse_callback(encode(body)).created_at is None


def test_model_comes_from_the_generation_or_its_request() -> None:
    body = {"id": "x", "state": "queued", "request": {"model": "photon-1"}}
    assert parse_callback(encode(body)).model == "photon-1"
    assert parse_callback(encode({**body, "model": "ray-2"})).model == "ray-2"


def test_topics_route_known_states_and_fold_the_rest_into_unknown() -> None:
    topics = Topics("p")
    assert topics.for_state("completed") == "p.completed"
    assert topics.for_state("paused") == "p.unknown"
    assert topics.all() == (
        "p.queued",
        "p.dreaming",
        "p.completed",
        "p.failed",
        "p.unknown",
        "p.lifecycle",
        "p.deadletter",
    )
    assert "p.lifecycle" not in topics.all(lifecycle=False)


def test_headers_carry_the_derived_metadata() -> None:
    callback = parse_callback(encode({**SEED_COMPLETED_VIDEO, "generation_type": "video"}))
    received = datetime(2026, 5, 30, 12, 35, 0, 250_000, tzinfo=UTC)
    assert dict(record_headers(callback, received)) == {
        "content-type": b"application/json",
        "luma-event-id": callback.event_id.encode(),
        "luma-transition-id": callback.transition_id.encode(),
        "luma-state": b"completed",
        "luma-received-at": b"2026-05-30T12:35:00.250Z",
        "luma-source": b"callback",
        "luma-generation-type": b"video",
    }
