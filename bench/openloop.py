"""An open-loop load generator: requests at a fixed rate, whatever the answers do.

wrk is closed-loop (a connection waits for its answer before the next request), so
a slow server quietly lowers the offered load ("coordinated omission"); wrk2 would
fix that but is not packaged by Debian. This generator sends request i at
t0 + i/rate on a pool of keep-alive connections and measures each answer from that
intended send time, so time spent queued (in the server or, when every connection
is busy, here) counts. It uses asyncio protocols on uvloop with pre-formatted
requests and parses only the status line and Content-Length, so one core sends
well over 10,000 requests/s: more than any target here answers.
Prints one JSON line: offered and achieved rates, statuses, latency percentiles.
Run: python -m bench.openloop --url http://127.0.0.1:8080/luma/callback/T --templates F --rate 500
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.payloads import generation_id, load_templates
from bench.stats import latency_summary_ms


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request outstanding."""

    def __init__(self, generator: OpenLoop) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.intended = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, intended: float) -> None:
        self.busy = True
        self.intended = intended
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        eol = head.find(b"\r\n", at)
        length = int(head[at + 15 : eol if eol >= 0 else len(head)]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        del self.buffer[: end + 4 + length]
        self.busy = False
        self.generator.answered(self, status, self.intended)

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.lost(self)


class OpenLoop:
    """Sends at `rate` per second for `warmup + duration` seconds; measures the last part."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        url = urlsplit(args.url)
        self.host, self.port, self.path = url.hostname, url.port or 80, url.path
        self.templates = load_templates(Path(args.templates))
        self.idle: collections.deque[Connection] = collections.deque()
        self.backlog: collections.deque[float] = collections.deque()
        self.counter = 0
        self.latencies: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.measure_from = 0.0
        self.measure_until = 0.0
        self.errors = 0
        self.pending = 0

    def request(self) -> bytes:
        self.counter += 1
        prefix, suffix = self.templates[self.counter % len(self.templates)]
        body = prefix + generation_id(os.getpid(), self.counter) + suffix
        return (
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (self.path.encode(), self.host.encode(), self.port, len(body), body)
        )

    def answered(self, connection: Connection, status: int, intended: float) -> None:
        now = time.perf_counter()
        self.pending -= 1
        if self.measure_from <= intended < self.measure_until:
            self.latencies.append(now - intended)
            self.statuses[status] += 1
        if self.backlog:
            connection.send(self.request(), self.backlog.popleft())
        else:
            self.idle.append(connection)

    def lost(self, connection: Connection) -> None:
        if connection.busy:
            self.errors += 1
            self.pending -= 1
        if connection in self.idle:
            self.idle.remove(connection)

    def dispatch(self, intended: float) -> None:
        self.pending += 1
        if self.idle:
            self.idle.popleft().send(self.request(), intended)
        else:
            self.backlog.append(intended)

    async def run(self) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        for _ in range(self.args.connections):
            _, connection = await loop.create_connection(
                lambda: Connection(self), self.host, self.port
            )
            self.idle.append(connection)
        rate = self.args.rate
        t0 = time.perf_counter()
        self.measure_from = t0 + self.args.warmup
        self.measure_until = self.measure_from + self.args.duration
        sent = 0
        while True:
            now = time.perf_counter()
            if now >= self.measure_until:
                break
            due = int((now - t0) * rate)
            while sent < due:
                self.dispatch(t0 + sent / rate)
                sent += 1
            await asyncio.sleep(0.0005)
        # Let what was sent in the window be answered (up to Luma's 5 s timeout more).
        deadline = time.perf_counter() + 5.0
        while self.pending > 0 and time.perf_counter() < deadline:  # noqa: ASYNC110 - a poll is simpler than an Event set from every answer
            await asyncio.sleep(0.01)
        unanswered = self.pending
        measured_sent = int(self.args.duration * rate)
        answered = sum(self.statuses.values())
        return {
            "offered_rps": rate,
            "achieved_rps": answered / self.args.duration,
            "sent": measured_sent,
            "answered": answered,
            "ok": self.statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "unanswered_within_5s": unanswered,
            "connection_errors": self.errors,
            "latency_ms": latency_summary_ms(self.latencies),
            # This process's CPU over its whole life: on 2 cores it shares a core with the
            # broker, so together they can be the bottleneck rather than the server.
            "loadgen_cpu_s": sum(os.times()[:2]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--templates", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=512)
    args = parser.parse_args()
    generator = OpenLoop(args)
    try:
        import uvloop

        result = uvloop.run(generator.run())
    except ImportError:
        result = asyncio.run(generator.run())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
