"""The contract's pure functions: validation, event id, routing, headers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bridge.contract.callback import (
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    MAX_STRING_CHARS,
    InvalidCallback,
    Topics,
    deadletter_headers,
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
    assert parse_callback(encode({**body, "request": {"model": 5}})).model is None
    assert parse_callback(encode({**body, "request": {}})).model is None


def test_a_body_that_is_not_an_object_says_so() -> None:
    for body in (b"[]", b'"text"', b"1"):
        with pytest.raises(InvalidCallback) as raised:
            parse_callback(body)
        assert (raised.value.kind, raised.value.reason) == ("shape", "body is not a JSON object")


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
    headers = dict(record_headers(callback, received))
    assert {name: value for name, value in headers.items() if not name.startswith("ce_")} == {
        "content-type": b"application/json",
        "luma-event-id": callback.event_id.encode(),
        "luma-transition-id": callback.transition_id.encode(),
        "luma-state": b"completed",
        "luma-received-at": b"2026-05-30T12:35:00.250Z",
        "luma-source": b"callback",
        "luma-generation-type": b"video",
    }


def nested_in_list(depth: int) -> bytes:
    """A valid callback whose deepest container sits at `depth` (the top object is depth 1)."""
    inner = depth - 1
    return b'{"id":"x","state":"queued","n":' + b"[" * inner + b"]" * inner + b"}"


def nested_in_objects(depth: int) -> bytes:
    inner = depth - 1
    return b'{"id":"x","state":"queued","n":' + b'{"a":' * inner + b"1" + b"}" * inner + b"}"


@pytest.mark.parametrize("nested", [nested_in_list, nested_in_objects])
def test_nesting_up_to_the_documented_32_levels_is_accepted(
    nested: Callable[[int], bytes],
) -> None:
    assert MAX_JSON_DEPTH == 32  # README "Limits" documents 32
    assert parse_callback(nested(32)).generation_id == "x"


@pytest.mark.parametrize("nested", [nested_in_list, nested_in_objects])
def test_nesting_one_level_deeper_than_32_is_refused(nested: Callable[[int], bytes]) -> None:
    with pytest.raises(InvalidCallback) as raised:
        parse_callback(nested(33))
    assert raised.value.kind == "json"
    assert "32" in raised.value.reason


def test_strings_and_member_names_up_to_the_bound_are_accepted_and_longer_ones_refused() -> None:
    fits = "a" * MAX_STRING_CHARS
    assert parse_callback(encode({"id": "x", "state": "queued", "p": fits})).state == "queued"
    assert parse_callback(encode({"id": "x", "state": "queued", fits: 1})).state == "queued"
    assert parse_callback(encode({"id": "x", "state": "queued", "l": [fits]})).state == "queued"
    for document in (
        {"id": "x", "state": "queued", "p": fits + "a"},
        {"id": "x", "state": "queued", fits + "a": 1},
        {"id": "x", "state": "queued", "l": [fits + "a"]},
    ):
        with pytest.raises(InvalidCallback) as raised:
            parse_callback(encode(document))
        assert raised.value.kind == "json"


def test_number_literals_up_to_the_bound_are_accepted_and_longer_ones_refused() -> None:
    digits = "9" * MAX_NUMBER_CHARS
    fraction = "0." + "5" * (MAX_NUMBER_CHARS - 2)
    for literal in (digits, fraction):
        body = b'{"id":"x","state":"queued","n":' + literal.encode() + b"}"
        assert parse_callback(body).state == "queued"
    for literal in (digits + "9", fraction + "5"):
        body = b'{"id":"x","state":"queued","n":' + literal.encode() + b"}"
        with pytest.raises(InvalidCallback) as raised:
            parse_callback(body)
        assert raised.value.kind == "json"


def test_the_event_id_of_the_seed_callback_is_pinned() -> None:
    # A change here re-keys every redelivery: consumers dedupe on luma-event-id.
    callback = parse_callback(encode(SEED_COMPLETED_VIDEO))
    assert callback.event_id == "ea3243ad0f4326a6f9457a2da2d637fa"
    assert event_id_for("a", "bc", b"") != event_id_for("ab", "c", b"")


def test_an_invalid_callback_says_its_reason_and_nothing_else() -> None:
    with pytest.raises(InvalidCallback) as raised:
        parse_callback(b'{"id":1,"state":"queued"}')
    assert raised.value.reason == "not a valid Generation: id: Input should be a valid string"
    assert str(raised.value) == raised.value.reason


def test_a_schema_error_names_at_most_five_members_by_their_path() -> None:
    body = b'{"id":1,"state":2,"failure_reason":3,"created_at":4,"generation_type":5,"model":6}'
    with pytest.raises(InvalidCallback) as raised:
        parse_callback(body)
    assert raised.value.reason == "not a valid Generation: " + "; ".join(
        f"{name}: Input should be a valid string"
        for name in ("id", "state", "failure_reason", "created_at", "generation_type")
    )
    with pytest.raises(InvalidCallback) as raised:
        parse_callback(b'{"id":"x","state":"queued","assets":{"video":5}}')
    assert raised.value.reason == (
        "not a valid Generation: assets.video: Input should be a valid string"
    )


def test_created_at_without_an_offset_is_utc_and_with_one_keeps_it() -> None:
    naive = parse_callback(
        encode({"id": "x", "state": "queued", "created_at": "2026-05-30T12:00:00"})
    )
    assert naive.created_at == datetime(2026, 5, 30, 12, 0, tzinfo=UTC)
    assert naive.created_at is not None
    assert naive.created_at.tzinfo is UTC
    offset = parse_callback(
        encode({"id": "x", "state": "queued", "created_at": "2026-05-30T12:00:00+02:00"})
    )
    assert offset.created_at == datetime(2026, 5, 30, 10, 0, tzinfo=UTC)


def test_values_beyond_orjson_are_re_encoded_compactly_by_the_standard_library() -> None:
    body = '{"id": "x", "state": "queued", "n": 123456789012345678901234567890, "s": "é"}'
    callback = parse_callback(body.encode())
    assert callback.value == (
        '{"id":"x","state":"queued","n":123456789012345678901234567890,"s":"é"}'.encode()
    )


def test_received_at_is_written_in_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    callback = parse_callback(encode(SEED_COMPLETED_VIDEO))
    received = datetime(2026, 5, 30, 21, 35, 0, 250_000, tzinfo=timezone(timedelta(hours=9)))
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        headers = dict(record_headers(callback, received))
        dead = dict(deadletter_headers("bad", received))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert headers["luma-received-at"] == b"2026-05-30T12:35:00.250Z"
    assert dead == {"luma-error": b"bad", "luma-received-at": b"2026-05-30T12:35:00.250Z"}


def test_headers_leave_out_an_absent_generation_type() -> None:
    now = datetime.now(UTC)
    bare = parse_callback(encode(SEED_COMPLETED_VIDEO))
    typed = parse_callback(encode({**SEED_COMPLETED_VIDEO, "generation_type": "video"}))
    without = [name for name, _ in record_headers(bare, now)]
    with_type = [name for name, _ in record_headers(typed, now)]
    assert "luma-generation-type" not in without
    # The same headers otherwise, in the same order.
    assert [name for name in with_type if name != "luma-generation-type"] == without
    assert without[:2] == ["content-type", "luma-event-id"]


def test_a_lone_surrogate_is_refused_as_not_utf8_json() -> None:
    with pytest.raises(InvalidCallback) as raised:
        parse_callback(b'{"id":"x","state":"queued","n":"\\udc00"}')
    assert (raised.value.kind, raised.value.reason) == ("json", "body is not valid UTF-8 JSON")
