"""Coverage-guided fuzz target (atheris) for the request-to-record path.

Each input becomes one raw HTTP/1.1 request (method, path, headers, body, token or not)
sent to the callback listener exactly as `serve` builds it (`bridge.server.callback_app`
and `open_callback_listener`), on an in-memory publisher. A finding is any answer that
breaks the endpoint's promises: no answer, an undocumented status or a 500, the token
echoed, or a record written for an unauthenticated request.

    python -m tests.fuzz.fuzz_request -max_total_time=600 [CORPUS_DIR ...]   # on demand
    python -m tests.fuzz.fuzz_request -runs=2000                             # CI's short run
    python -m tests.fuzz.fuzz_request --fallback-runs 2000    # without atheris: random mutation

Input layout: byte 0 holds flags (token in path, bearer header, JSON content type,
chunked body); the rest is split on NUL into method, path suffix, header lines, body.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys

# Third-party modules first, uninstrumented: only the bridge's own code guides the fuzzer.
import aiohttp.web  # noqa: F401
import prometheus_client
import pydantic  # noqa: F401

try:
    import atheris  # type: ignore[import-untyped]  # ships no type information
except ImportError:  # the fallback runner below still exercises the target
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["bridge"]):
        from bridge.contract import callback  # noqa: F401
        from bridge.delivery import pipeline  # noqa: F401
        from bridge.edge import http  # noqa: F401
        from bridge.ops.metrics import Metrics
        from bridge.server import callback_app, open_callback_listener
        from bridge.settings import load_settings
else:
    from bridge.ops.metrics import Metrics
    from bridge.server import callback_app, open_callback_listener
    from bridge.settings import load_settings

from tests.edge.support import DOCUMENTED_STATUSES, send_raw
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN, MemoryPublisher

SKIPPED_HEADERS = {"content-length", "transfer-encoding", "host", "connection", "expect"}
HEADER_NAME = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,40}$")
SEEDS = [
    b"\x05POST\x00\x00X-Trace: 1\x00" + json.dumps(SEED_COMPLETED_VIDEO).encode(),
    b"\x04POST\x00\x00\x00" + json.dumps(SEED_COMPLETED_VIDEO).encode(),
    b'\x07POST\x00?token=x\x00Accept: */*\x00{"id":"a","state":"queued"}',
    b'\x0dPOST\x00\x00\x00{"id":"b","state":"failed","n":[[[[1e308]]]]}',
    b"\x01GET\x00/extra\x00\x00",
]


class Target:
    """The listener, started once; `run` sends one input through it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.publisher = MemoryPublisher()
        settings = load_settings(
            host="127.0.0.1",
            port=0,
            auth_tokens=TOKEN,
            topic_prefix="f",
            spool_enabled=False,
            max_body_bytes=16 * 1024,
            body_timeout=2,
            header_timeout=2,
        )
        metrics = Metrics(prometheus_client.CollectorRegistry())
        app = callback_app(settings, publisher=self.publisher, metrics=metrics)
        self.runner, site = self.loop.run_until_complete(
            open_callback_listener(app, settings, metrics=metrics)
        )
        self.port = site.port

    def run(self, data: bytes) -> None:
        raw, authenticated, method = build_request(data)
        before = len(self.publisher.records)
        answer = self.loop.run_until_complete(send_raw(self.port, raw, timeout=10))
        if answer.status is None:
            raise AssertionError(f"no answer to {raw[:200]!r}")
        if answer.status not in DOCUMENTED_STATUSES or answer.status == 500:
            raise AssertionError(f"status {answer.status} for {raw[:200]!r}")
        if TOKEN.encode() in answer.body:
            raise AssertionError("the token was echoed")
        if method != "HEAD":
            json.loads(answer.body)  # every answer is a small JSON body
        if not authenticated and (answer.status == 200 or len(self.publisher.records) != before):
            raise AssertionError(f"unauthenticated request written: {raw[:200]!r}")
        del self.publisher.records[:]


def build_request(data: bytes) -> tuple[bytes, bool, str]:
    """The raw request an input stands for, whether it carries the token, and its method."""
    flags = data[0] if data else 0
    parts = data[1:].split(b"\x00", 3) + [b""] * 4
    method = re.sub(rb"[^A-Z]", b"", parts[0][:12]).decode() or "POST"
    suffix = re.sub(rb"[^\x21-\x7e]", b"", parts[1][:200]).decode().replace("#", "")
    token_in_path = bool(flags & 1)
    path = "/luma/callback" + (f"/{TOKEN}" if token_in_path else "") + suffix
    if not path.startswith("/"):
        path = "/" + path
    headers: list[tuple[str, str]] = []
    for line in parts[2].split(b"\n")[:20]:
        name, _, value = line.partition(b":")
        if HEADER_NAME.match(name) and name.lower().decode() not in SKIPPED_HEADERS:
            clean = re.sub(rb"[^\x20-\x7e\x80-\xff]", b"", value[:200]).strip()
            headers.append((name.decode(), clean.decode("latin-1")))
    bearer = bool(flags & 2)
    if bearer:
        headers.append(("Authorization", f"Bearer {TOKEN}"))
    if flags & 4:
        headers.append(("Content-Type", "application/json"))
    body = parts[3]
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if flags & 8:
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    # The exact path decides the route: only the token as the whole last segment counts.
    path_only = path.split("?", 1)[0]
    authenticated = bearer or path_only == f"/luma/callback/{TOKEN}"
    return head + payload, authenticated, method


def fallback(runs: int, seed: int = 1) -> None:
    """Random mutations of the seeds, for machines without atheris (not coverage-guided)."""
    rng = random.Random(seed)
    target = Target()
    for n in range(runs):
        data = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            where = rng.randrange(len(data) + 1)
            if op < 0.4 and data:
                data[min(where, len(data) - 1)] = rng.randrange(256)
            elif op < 0.7:
                data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif data:
                del data[where : where + rng.randint(1, 16)]
        try:
            target.run(bytes(data))
        except Exception:
            print(f"finding after {n} runs: {bytes(data)!r}", file=sys.stderr)
            raise
    print(f"fallback: {runs} inputs, no finding")


def main(argv: list[str]) -> None:
    if "--fallback-runs" in argv:
        fallback(int(argv[argv.index("--fallback-runs") + 1]))
        return
    if atheris is None:
        raise SystemExit("atheris is not installed: pip install atheris, or use --fallback-runs N")
    target = Target()
    for seed in SEEDS:  # the seeds must pass before the fuzzer mutates them
        target.run(seed)

    def one_input(data: bytes) -> None:
        target.run(data)

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
