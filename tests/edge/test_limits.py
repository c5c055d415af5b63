"""Limits on the callback port: head size and count, body size and time, head deadline,
connections. Each is answered with a documented status (or a closed connection for a
head that never comes), and nothing is written."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from bridge.edge.limits import Phase
from tests.edge.support import (
    PATH,
    SEED_BODY,
    read_answer,
    request_bytes,
    running_edge,
    send_raw,
)
from tests.helpers import TOKEN, wait_until

HUNDRED_MB = 100 * 1024 * 1024


async def test_a_header_line_over_the_limit_is_answered_431_without_echo() -> None:
    async with running_edge(max_header_bytes=1024) as edge:
        answer = await send_raw(edge.port, request_bytes(headers={"X-Big": TOKEN * 200}))
        assert answer.status == 431
        assert json.loads(answer.body) == {
            "status": "rejected",
            "error": "request header fields too large",
        }
        long_path = request_bytes(path=f"{PATH}?pad={'a' * 2000}")
        assert (await send_raw(edge.port, long_path)).status == 431
        assert edge.publisher.records == []
        assert edge.sample("luma_bridge_callbacks_total", state="none", outcome="rejected") == 2


async def test_too_many_headers_are_answered_431() -> None:
    async with running_edge(max_headers=16) as edge:
        headers = {f"X-H{i}": "v" for i in range(20)}
        assert (await send_raw(edge.port, request_bytes(headers=headers))).status == 431
        headers = {f"X-H{i}": "v" for i in range(10)}
        assert (await send_raw(edge.port, request_bytes(headers=headers))).status == 200


async def test_a_malformed_request_line_gets_400_that_does_not_quote_it() -> None:
    async with running_edge() as edge:
        answer = await send_raw(edge.port, f"P\x00ST {PATH} HTTP/1.1\r\n\r\n".encode())
        assert answer.status == 400
        assert TOKEN.encode() not in answer.body
        assert json.loads(answer.body)["status"] == "rejected"


async def test_a_100_mb_body_announced_by_content_length_is_refused_before_it_is_read() -> None:
    async with running_edge() as edge:
        head = request_bytes(body=b"", headers={"Content-Length": str(HUNDRED_MB)})
        started = time.monotonic()
        answer = await send_raw(edge.port, head)  # the body is never sent
        assert answer.status == 413
        assert time.monotonic() - started < 1.0
        unauthenticated = head.replace(PATH.encode(), b"/luma/callback/nope")
        assert (await send_raw(edge.port, unauthenticated)).status == 401
        assert edge.publisher.records == []


async def test_a_streamed_100_mb_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    async with running_edge() as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        head = request_bytes(
            body=b"", headers={"Transfer-Encoding": "chunked"}, content_length=False
        )
        writer.write(head)
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        answer_task = asyncio.create_task(read_answer(reader, timeout=10))
        sent = 0
        started = time.monotonic()
        try:
            while sent < HUNDRED_MB and not answer_task.done():
                writer.write(chunk)
                await writer.drain()
                sent += 64 * 1024
        except ConnectionError:
            pass
        answer = await answer_task
        writer.close()
        assert answer.status == 413
        assert sent < HUNDRED_MB / 4, f"server read {sent} bytes before refusing"
        assert time.monotonic() - started < 5
        assert edge.publisher.records == []


async def test_a_body_that_stalls_is_answered_408() -> None:
    async with running_edge(body_timeout=0.5) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        full = request_bytes()
        writer.write(full[: len(full) - 10])  # the head and most of the body
        started = time.monotonic()
        answer = await read_answer(reader, timeout=5)
        writer.close()
        assert answer.status == 408
        assert 0.4 < time.monotonic() - started < 3
        assert json.loads(answer.body)["status"] == "rejected"
        assert edge.publisher.records == []


async def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_deadline() -> None:
    async with running_edge(header_timeout=0.5) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in request_bytes():
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        started = time.monotonic()
        async with asyncio.timeout(3):
            try:
                leftover = await reader.read()  # EOF once the server closes the connection
            except ConnectionResetError:
                # Closed while a trickled byte was still unread on its side: the kernel
                # resets instead of ending the stream. Closed all the same, not answered.
                leftover = b""
        closed_after = time.monotonic() - started
        sender.cancel()
        writer.close()
        assert leftover == b""  # closed, not answered
        assert 0.4 < closed_after < 2
        assert edge.site.guard.timed_out == 1
        assert edge.publisher.records == []


async def test_an_idle_kept_alive_connection_is_closed_at_the_deadline() -> None:
    async with running_edge(header_timeout=0.5) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(request_bytes())
        assert (await read_answer(reader)).status == 200
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # closed by the server
        writer.close()


async def test_each_answer_restarts_the_deadline_of_a_kept_alive_connection() -> None:
    """The connection's one timer fires while it is idle between requests, before its
    deadline (moved on by the last answer): it waits on instead of closing."""
    async with running_edge(header_timeout=0.5) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        for number in range(5):  # 1.2 s of requests 0.3 s apart: longer than the deadline
            if number:
                await asyncio.sleep(0.3)
            writer.write(request_bytes())
            assert (await read_answer(reader)).status == 200
        answered = time.monotonic()
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # closed by the server once idle
        closed_after = time.monotonic() - answered
        writer.close()
        assert 0.4 < closed_after < 2
        assert edge.site.guard.timed_out == 1


async def test_past_the_connection_bound_the_longest_idle_connection_makes_room() -> None:
    async with running_edge(max_connections=5) as edge:
        idle = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(5)]
        answer = await send_raw(edge.port, request_bytes())
        assert answer.status == 200
        async with asyncio.timeout(3):
            assert await idle[0][0].read() == b""  # the oldest was closed for it
        assert edge.site.guard.evicted >= 1
        for _, writer in idle:
            writer.close()


async def test_a_slow_body_is_closed_to_make_room_when_no_connection_is_idle() -> None:
    async with running_edge(max_connections=3, body_timeout=30) as edge:
        full = request_bytes()
        slow = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(full[:-5])  # authenticated, body not finished
            slow.append((reader, writer))
        await wait_until(
            lambda: all(h.phase is Phase.READING for h in edge.site.guard.connections()),
            what="three bodies being read",
        )
        assert (await send_raw(edge.port, request_bytes())).status == 200
        async with asyncio.timeout(3):
            assert await slow[0][0].read() == b""  # the oldest slow body made room
        for _, writer in slow:
            writer.close()


async def test_when_every_connection_is_being_worked_on_a_new_one_gets_503() -> None:
    async with running_edge(max_connections=3) as edge:
        edge.publisher.gate = asyncio.Event()  # Kafka holds every write
        working = []
        for n in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            body = SEED_BODY.replace(b"d1ad97c4", b"%08d" % n)
            writer.write(request_bytes(body=body))
            working.append((reader, writer))
        await wait_until(lambda: edge.publisher.calls == 3, what="three writes waiting")
        answer = await send_raw(edge.port, request_bytes())
        assert answer.status == 503
        assert answer.headers["retry-after"] == "1"
        assert edge.sample("luma_bridge_shed_total", reason="connection_limit") == 1
        edge.publisher.gate.set()
        for reader, writer in working:
            assert (await read_answer(reader)).status == 200
            writer.close()
