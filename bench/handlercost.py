"""The bridge's own cost per callback: its handler alone, without HTTP or a Kafka client.

The public app as `serve` builds it (`callback_app` with the default settings: validation,
dedupe, lanes, metrics, the JSON log line at INFO) handles callbacks given to it as parsed
requests, through the bridge's own `KafkaPublisher` (its futures, acknowledgement
callbacks and produce-time histogram) on a stand-in for aiokafka's producer that
acknowledges each record as it is handed over. What is left is the work the bridge adds
to what any HTTP-to-Kafka service does, measured two ways:

* CPU microseconds per callback (process time, threads included; best of 8 rounds);
* `--instructions`: instructions per callback, counted by valgrind (`cachegrind`,
  Debian's `valgrind`), as the difference between a run that handles the callbacks and
  one that only prepares them. Unlike time, the count does not move with whatever else
  the machine runs, so two versions of the code can be compared on a shared machine.
  Nothing may depend on the clock for that: the log writer then writes every line in
  one batch at the end (formatting included) instead of every 50 ms, and the rounds
  do not pause.

Run: python -m bench.handlercost [--callbacks N] [--instructions] [--log-level WARNING]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, NamedTuple
from unittest import mock

from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from bench.payloads import PLACEHOLDER, templates
from bridge.cli import run_async
from bridge.delivery import publisher as publisher_module
from bridge.delivery.publisher import KafkaPublisher
from bridge.ops.logs import WRITE_INTERVAL_SECONDS, configure_logging
from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import LogLevel, Settings, load_settings

TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway token, no server listens
PATH = f"/luma/callback/{TOKEN}"
WARMUP = 200
ROUNDS = 8


class _Acknowledgement(NamedTuple):
    """What `KafkaPublisher` reads of aiokafka's `RecordMetadata`."""

    partition: int
    offset: int


class AckingProducer:
    """Stands in for `AIOKafkaProducer`: every record is acknowledged as it is handed over,
    so the publisher's own work is measured, and no Kafka client or broker is."""

    def __init__(self, **_options: Any) -> None:
        self.client = SimpleNamespace(_metadata_update=None)  # what the publisher paces
        self._offsets = itertools.count()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[_Acknowledgement]:
        acknowledged: asyncio.Future[_Acknowledgement] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(_Acknowledgement(0, next(self._offsets)))
        return acknowledged


@contextlib.asynccontextmanager
async def acking_publisher(settings: Settings, metrics: Metrics) -> AsyncIterator[KafkaPublisher]:
    """The bridge's publisher, started on an `AckingProducer`, stopped on the way out
    (a started publisher counts the retries aiokafka logs, process-wide)."""
    publisher = KafkaPublisher(settings, metrics=metrics)
    with mock.patch.object(publisher_module, "AIOKafkaProducer", AckingProducer):
        await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


class _Transport:
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


class _Protocol:
    """What a request reads from the connection it came on."""

    transport = _Transport()
    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 8080)

    def __init__(self) -> None:
        self._reading_paused = False

    def pause_reading(self) -> None:
        return None

    def resume_reading(self, resume_parser: bool = True) -> None:
        return None


async def prepared_requests(app: web.Application, count: int) -> list[web.Request]:
    """`count` callbacks (a new generation id each), parsed and routed as aiohttp would."""
    bodies = templates()
    protocol = _Protocol()
    requests = []
    for number in range(count):
        generation_id = f"c0ffee00-0000-4000-8000-{number:012d}"
        body = bodies[number % len(bodies)].replace(PLACEHOLDER, generation_id).encode()
        payload = streams.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        payload.feed_data(body)
        payload.feed_eof()
        request = make_mocked_request(
            "POST",
            PATH,
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
            payload=payload,
            app=app,
            protocol=protocol,
            transport=protocol.transport,
        )
        match = await app.router.resolve(request)
        match.add_app(app)
        match.freeze()
        request._match_info = match
        requests.append(request)
    return requests


async def measure(callbacks: int, handle: bool, pause: float = 0.06) -> dict[str, float]:
    settings = load_settings(auth_tokens=TOKEN, kafka_bootstrap_servers="127.0.0.1:9")
    metrics = Metrics(CollectorRegistry())
    async with acking_publisher(settings, metrics) as publisher:
        app = callback_app(settings, publisher=publisher, metrics=metrics)
        return await _handle_all(app, callbacks, handle, pause)


async def _handle_all(
    app: web.Application, callbacks: int, handle: bool, pause: float
) -> dict[str, float]:
    requests = await prepared_requests(app, WARMUP + callbacks)
    if not handle:
        return {}
    for request in requests[:WARMUP]:
        await app._handle(request)
    rounds = [requests[WARMUP + n :: ROUNDS] for n in range(ROUNDS)]
    best = float("inf")
    for batch in rounds:
        started = time.process_time()
        for request in batch:
            response = await app._handle(request)
            if response.status != 200:
                raise RuntimeError(f"the bridge answered {response.status}, not 200")
        best = min(best, (time.process_time() - started) / len(batch))
        await asyncio.sleep(pause)  # the log writer's interval: its work falls in a round
    return {"cpu_us_per_callback": round(best * 1e6, 1)}


def instructions(callbacks: int, log_level: str) -> int:
    """Instructions per callback: cachegrind's count with handling, minus without."""
    counts = []
    for mode in ("--handle", "--prepare-only"):
        command = [
            *("valgrind", "--tool=cachegrind", "--cache-sim=no"),
            "--cachegrind-out-file=/dev/null",
            *(sys.executable, "-m", "bench.handlercost", mode),
            *("--callbacks", str(callbacks), "--log-level", log_level),
        ]
        print(f"counting instructions: {mode[2:]} ({callbacks} callbacks) ...", file=sys.stderr)
        done = subprocess.run(  # noqa: S603 - our own command
            command,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]}")
        counts.append(int(found.group(1).replace(",", "")))
    return (counts[0] - counts[1]) // (callbacks + WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callbacks", type=int, default=4000)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions with valgrind"
    )
    parser.add_argument("--handle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    level: LogLevel = args.log_level
    if args.instructions:
        count = instructions(args.callbacks, level)
        print(json.dumps({"instructions_per_callback": count}), flush=True)
        return
    counting = args.handle or args.prepare_only  # under valgrind: nothing on a clock
    interval = 24 * 3600.0 if counting else WRITE_INTERVAL_SECONDS
    handler = configure_logging(level, "json", interval=interval)
    result = run_async(  # uvloop, as `serve`
        measure(args.callbacks, handle=not args.prepare_only, pause=0.0 if counting else 0.06)
    )
    handler.close()
    if result:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
