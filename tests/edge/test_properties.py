"""Property-based: whatever arrives on the callback port, the answer is documented, never a
500, and nothing is written unless the request was authenticated."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.contract.callback import InvalidCallback, parse_callback
from tests.edge.support import (
    DOCUMENTED_STATUSES,
    PATH,
    SEED_BODY,
    Edge,
    running_edge,
    send_raw,
)
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN

SHARED = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HEADER_NAME = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,30}\Z").filter(
    lambda name: (
        name.lower()
        not in {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}
    )
)
HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80).map(
    str.strip
)
PATH_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=60
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "application/problem+json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "",
        "application/",
    ]
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _nested(depth: int) -> bytes:
    return b'{"id":"x","state":"queued","n":' + b"[" * depth + b"]" * depth + b"}"


# Bodies whose answer is known by hand (with a JSON content type and within the size limit).
SPECIAL_ANSWERS = {
    b"": 400,
    b"\xff\xfe\x00": 400,  # not UTF-8
    b'{"id":"x","state":"queued","id":"y"}': 400,  # duplicate member
    b'{"id":"x","state":"queued","n":NaN}': 400,
    b'{"id":"x","state":"queued","n":1e999}': 400,
    b'{"id":"x","state":"queued","n":' + b"9" * 5000 + b"}": 400,
    b'{"id":"x","state":"queued","n":"\\ud800"}': 400,  # a lone surrogate
    _nested(31): 200,  # the top object and 31 lists: 32 levels, the documented limit
    _nested(32): 400,
    _nested(5000): 413,  # also larger than the 8 KiB limit of these tests
    b"[]": 400,
    b"null": 400,
    SEED_BODY: 200,
    json.dumps({**SEED_COMPLETED_VIDEO, "state": "dreaming"}).encode(): 200,
}
SPECIAL_BODIES = st.sampled_from(list(SPECIAL_ANSWERS))
BODIES = (
    SPECIAL_BODIES
    | st.binary(max_size=300)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(["id", "state", "assets", "created_at"]), JSON_VALUES).map(
        lambda v: json.dumps(v).encode()
    )
)


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    async with running_edge(max_body_bytes=8 * 1024) as running:
        yield running


def raw_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bridge", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def authenticated(path: str, headers: list[tuple[str, str]]) -> bool:
    return path.split("?", 1)[0] == PATH or any(
        name.lower() == "authorization" and value == f"Bearer {TOKEN}" for name, value in headers
    )


async def check(
    edge: Edge, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> int:
    before = len(edge.publisher.records)
    answer = await send_raw(edge.port, raw_request(method, path, headers, body))
    assert answer.status is not None, "connection closed without an answer"
    assert answer.status in DOCUMENTED_STATUSES, answer
    assert TOKEN.encode() not in answer.body
    if method != "HEAD":  # a HEAD answer has no body
        document: Any = json.loads(answer.body)
        assert set(document) >= {"status"}
    if not authenticated(path, headers):
        assert answer.status != 200
        assert len(edge.publisher.records) == before, "an unauthenticated request was written"
    if answer.status not in (200, 400):
        assert len(edge.publisher.records) == before
    return answer.status


@SHARED
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    | st.from_regex(r"\A[A-Z]{1,10}\Z"),
    path=st.sampled_from([PATH, "/luma/callback", "/luma/callback/wrong", "/"])
    | PATH_TEXT.map(lambda p: "/" + p)
    | PATH_TEXT.map(lambda p: f"/luma/callback/{p}"),
    headers=st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=6),
    content_type=CONTENT_TYPES,
    body=BODIES,
)
async def test_any_request_gets_a_documented_answer(
    edge: Edge,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    content_type: str | None,
    body: bytes,
) -> None:
    if content_type is not None:
        headers = [*headers, ("Content-Type", content_type)]
    assert await check(edge, method, path, headers, body) != 500


JSON_CONTENT_TYPES = {
    None,  # no Content-Type at all is taken as JSON
    "application/json",
    "application/json; charset=utf-8",
    "application/problem+json",
}
MAX_BODY_BYTES = 8 * 1024


def expected_status(body: bytes, content_type: str | None) -> int:
    """The one answer for an authenticated POST: 415, then 413, then what the contract says.

    Generated bodies are judged by the contract's own parser (its cases are pinned by hand
    in tests/contract); the special bodies by hand.
    """
    if content_type not in JSON_CONTENT_TYPES:
        return 415
    if len(body) > MAX_BODY_BYTES:
        return 413
    if body in SPECIAL_ANSWERS:
        return SPECIAL_ANSWERS[body]
    try:
        parse_callback(body)
    except InvalidCallback:
        return 400
    return 200


@SHARED
@given(body=BODIES, content_type=CONTENT_TYPES, bearer=st.booleans())
async def test_any_body_from_an_authenticated_sender_gets_its_one_answer(
    edge: Edge, body: bytes, content_type: str | None, bearer: bool
) -> None:
    headers = [("Content-Type", content_type)] if content_type is not None else []
    path = PATH
    if bearer:
        headers.append(("Authorization", f"Bearer {TOKEN}"))
        path = "/luma/callback"
    before = len(edge.publisher.records)
    status = await check(edge, "POST", path, headers, body)
    assert status == expected_status(body, content_type)
    written = edge.publisher.records[before:]
    if status == 400:
        # The raw body, as received, is dead-lettered (or was already, for a repeat).
        assert all(r.topic == "t.deadletter" and r.value == body for r in written)
    if status == 200:
        value = json.loads(written[0].value) if written else None
        assert value is None or isinstance(value, dict)
        assert all(math.isfinite(v) for v in _numbers(value))


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)] if abs(value) < 1e300 else [0.0]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in _numbers(item)]


@SHARED
@given(token=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40))
async def test_no_token_but_the_right_one_writes_anything(edge: Edge, token: str) -> None:
    if token == TOKEN:
        return
    answer = await send_raw(
        edge.port,
        raw_request("POST", "/luma/callback", [("Authorization", f"Bearer {token}")], SEED_BODY),
    )
    assert answer.status == 401
    assert edge.publisher.records == []
