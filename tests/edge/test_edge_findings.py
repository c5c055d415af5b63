"""Issue 11, finding 9 ("The edge"), through a running listener and raw HTTP/1.1.

Each test here failed on the code before the change: a body that lies about its
Content-Encoding took the 'unexpected' path (503, connection reset); with HMAC on,
the body was read before the token was checked; nothing bounded the bytes of all
bodies in flight; a generation id had no length bound.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import zlib
from contextlib import suppress

import pytest

from bridge.contract.callback import MAX_GENERATION_ID_CHARS
from bridge.edge.signing import sign
from bridge.settings import SettingsError, load_settings
from tests.edge.support import (
    HMAC_KEY,
    HMAC_SECRET,
    PATH,
    SEED_BODY,
    read_answer,
    request_bytes,
    running_edge,
    send_raw,
)
from tests.helpers import SEED_COMPLETED_VIDEO, wait_until


def signed(body: bytes, webhook_id: str = "msg_1") -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(HMAC_KEY, webhook_id, timestamp, body),
    }


@pytest.mark.parametrize("coding", ["gzip", "deflate", "x-gzip", "gzip, deflate"])
async def test_a_body_that_lies_about_its_encoding_is_invalid_and_dead_lettered(
    coding: str,
) -> None:
    """Labelled compressed, sent plain: the sender's error. 400 `invalid`, the raw bytes on
    the dead-letter topic, and the same connection still serves the next request."""
    async with running_edge() as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        try:
            writer.write(request_bytes(headers={"Content-Encoding": coding}))
            answer = await read_answer(reader)
            assert answer.status == 400
            assert json.loads(answer.body)["status"] == "invalid"
            assert "content-encoding" in json.loads(answer.body)["error"].lower()
            assert [(r.topic, r.value) for r in edge.publisher.records] == [
                ("t.deadletter", SEED_BODY)
            ]
            assert edge.sample("luma_bridge_deadletters_total", reason="encoding") == 1
            # The connection is reusable: the next request on it is answered normally.
            writer.write(request_bytes())
            follow_up = await read_answer(reader)
            assert follow_up.status == 200
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
        assert edge.sample("luma_bridge_callbacks_total", state="none", outcome="unavailable") == 0


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some send it
        ("identity", lambda data: data),
    ],
)
async def test_an_honestly_encoded_body_is_accepted(coding: str, encode: object) -> None:
    assert callable(encode)
    async with running_edge() as edge:
        body = encode(SEED_BODY)
        answer = await send_raw(
            edge.port, request_bytes(body=body, headers={"Content-Encoding": coding})
        )
        assert answer.status == 200
        assert (
            edge.publisher.records[0].value
            == json.dumps(SEED_COMPLETED_VIDEO, separators=(",", ":")).encode()
        )


async def test_a_compressed_body_larger_than_the_limit_once_decoded_is_413() -> None:
    async with running_edge() as edge:
        bomb = gzip.compress(b" " * (edge.settings.max_body_bytes + 1) + SEED_BODY)
        answer = await send_raw(
            edge.port, request_bytes(body=bomb, headers={"Content-Encoding": "gzip"})
        )
        assert answer.status == 413
        assert json.loads(answer.body) == {
            "status": "rejected",
            "error": f"body larger than {edge.settings.max_body_bytes} bytes",
        }
        assert edge.publisher.records == []


async def test_an_unknown_encoding_is_415_before_the_body_is_read() -> None:
    async with running_edge() as edge:
        answer = await send_raw(edge.port, request_bytes(headers={"Content-Encoding": "br"}))
        assert answer.status == 415
        assert json.loads(answer.body) == {
            "status": "rejected",
            "error": "content encoding must be gzip, deflate or identity",
        }
        assert edge.publisher.records == []


async def test_an_answer_before_the_body_is_read_closes_the_connection() -> None:
    """A 408 leaves the rest of the body on the wire: `Connection: close`, not a reset later."""
    async with running_edge(body_timeout=0.5) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        try:
            head = request_bytes(headers={"Content-Length": str(len(SEED_BODY))}, body=b"")
            writer.write(head + SEED_BODY[:10])
            answer = await read_answer(reader)
            assert answer.status == 408
            assert answer.headers.get("connection") == "close"
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()


async def test_with_hmac_a_wrong_token_is_refused_before_the_body_is_read() -> None:
    """The head alone decides a wrong token: 401 at once, though the body never comes."""
    async with running_edge(hmac_secrets=HMAC_SECRET, body_timeout=30) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        try:
            head = request_bytes(
                path="/luma/callback/wrong-token",
                headers={"Content-Length": "60000", **signed(SEED_BODY)},
                body=b"",
            )
            writer.write(head)  # and no body at all
            started = time.monotonic()
            answer = await read_answer(reader, timeout=10)
            assert answer.status == 401
            assert time.monotonic() - started < 5  # not the body timeout (30 s)
            assert answer.headers.get("connection") == "close"
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
        # With the right token the signed body is still read and checked.
        good = request_bytes(headers=signed(SEED_BODY))
        assert (await send_raw(edge.port, good)).status == 200


async def test_bodies_in_flight_are_bounded_by_a_global_budget() -> None:
    """Two slow senders declaring 60 KiB each do not fit a 100 KiB budget: the second is
    answered 503 at once (shed, `body_budget`), and its room comes back afterwards."""
    async with running_edge(max_body_bytes=64 * 1024, max_buffered_body_bytes=100 * 1024) as edge:
        big = request_bytes(headers={"Content-Length": str(60 * 1024)}, body=b"")
        _, first = await asyncio.open_connection("127.0.0.1", edge.port)
        try:
            first.write(big + b"{")  # holds its 60 KiB reservation while it trickles
            await first.drain()
            await wait_until(lambda: edge.sample("luma_bridge_inflight_requests") == 1, timeout=10)
            second = await send_raw(edge.port, big + b"{")
            assert second.status == 503
            assert json.loads(second.body) == {
                "status": "unavailable",
                "error": "too many request bodies in flight; retry later",
            }
            assert second.headers.get("retry-after") == "1"
            assert edge.sample("luma_bridge_shed_total", reason="body_budget") == 1
        finally:
            first.close()
            with suppress(ConnectionError):
                await first.wait_closed()
        # Once the first sender is gone, its reservation is given back.
        await wait_until(lambda: edge.sample("luma_bridge_inflight_requests") == 0, timeout=10)
        assert (await send_raw(edge.port, request_bytes())).status == 200


def test_the_body_budget_must_hold_one_body() -> None:
    with pytest.raises(SettingsError, match="LUMA_BRIDGE_MAX_BUFFERED_BODY_BYTES"):
        load_settings(max_body_bytes=2 * 1024 * 1024, max_buffered_body_bytes=1024 * 1024)


async def test_a_generation_id_over_the_bound_is_invalid_and_dead_lettered() -> None:
    async with running_edge() as edge:
        long_id = "g" * (MAX_GENERATION_ID_CHARS + 1)
        body = json.dumps({**SEED_COMPLETED_VIDEO, "id": long_id}).encode()
        answer = await send_raw(edge.port, request_bytes(body=body))
        assert answer.status == 400
        assert json.loads(answer.body)["status"] == "invalid"
        assert long_id not in answer.body.decode()  # never echoes the input
        assert [(r.topic, r.key, r.value) for r in edge.publisher.records] == [
            ("t.deadletter", None, body)
        ]
        at_bound = json.dumps({**SEED_COMPLETED_VIDEO, "id": "g" * MAX_GENERATION_ID_CHARS})
        assert (await send_raw(edge.port, request_bytes(body=at_bound.encode()))).status == 200


async def test_the_write_token_in_callback_url_never_reaches_a_record() -> None:
    async with running_edge() as edge:
        token = PATH.rsplit("/", 1)[1]
        value = {
            **SEED_COMPLETED_VIDEO,
            "request": {
                **SEED_COMPLETED_VIDEO["request"],
                "callback_url": f"https://bridge.example.com{PATH}?token={token}",
            },
        }
        body = json.dumps(value).encode()
        assert (await send_raw(edge.port, request_bytes(body=body))).status == 200
        invalid = json.dumps({**value, "state": 7}).encode()
        assert (await send_raw(edge.port, request_bytes(body=invalid))).status == 400
        assert len(edge.publisher.records) == 3  # per-state, lifecycle, dead letter
        for record in edge.publisher.records:
            assert token.encode() not in record.value
            assert base64.b64encode(token.encode()) not in record.value
