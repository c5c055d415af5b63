"""What callback verification costs: answer latency with VERIFY=off, tag and enforce.

One bridge process per mode (`luma-kafka-bridge serve`) on the embedded broker, the
fake Luma API (`bridge.devtools.fake_luma`) on localhost in a thread of this process,
and N callbacks sent one at a time (each mode twice, interleaved), each for a
generation of its own (so every verified callback is a real lookup, never a cache
hit). Prints p50/p90/p99 per mode and writes bench/results/verify-latency.json.

The fake API answers on localhost in well under a millisecond: what this measures
is the bridge's own cost of a lookup (the lumaai client, a local HTTP round trip,
the decision), a lower bound. In production add Luma's API round trip from your
cluster (its p50/p99 are what `luma_bridge_verify_luma_api_duration_seconds` shows).

Run: python -m bench.verify_latency [--count 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from bench.stats import latency_summary_ms
from bridge.devtools.embedded import EmbeddedBroker, free_port, wait_for_port
from bridge.devtools.fake_luma import FakeLumaAPI

API_KEY = "bench-verify-key"
TOKEN = "bench-verify-token-0123456789"  # noqa: S105 - a throwaway local token
MODES = ("off", "tag", "enforce")
JSON = {"Content-Type": "application/json"}
RESULTS = Path(__file__).parent / "results" / "verify-latency.json"
SEED = {
    "state": "completed",
    "failure_reason": None,
    "created_at": "2024-11-20T14:21:05.113Z",
    "assets": {"video": "https://storage.cdn-luma.com/dream_machine/bench/video.mp4"},
    "version": "v1",
    "request": {"prompt": "a lighthouse at dusk", "aspect_ratio": "16:9", "loop": False},
}


def generation(number: int) -> dict[str, Any]:
    return {**SEED, "id": f"bench-{number:06d}"}


@contextmanager
def fake_api_in_thread(count: int) -> Iterator[str]:
    """The fake Luma API with `count` completed generations, on its own event loop."""
    loop = asyncio.new_event_loop()
    api = FakeLumaAPI(api_key=API_KEY)
    for number in range(count):
        api.put(generation(number))
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(api.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield api.base_url
    finally:
        asyncio.run_coroutine_threadsafe(api.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def bridge_env(bootstrap: str, mode: str, api_url: str, port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LUMA_BRIDGE_KAFKA_ENABLE_IDEMPOTENCE": "false",
        "LUMA_BRIDGE_HOST": "127.0.0.1",
        "LUMA_BRIDGE_PORT": str(port),
        "LUMA_BRIDGE_ADMIN_PORT": "0",
        "LUMA_BRIDGE_AUTH_TOKENS": TOKEN,
        "LUMA_BRIDGE_TOPIC_PREFIX": f"bench.{uuid.uuid4().hex[:8]}",
        "LUMA_BRIDGE_TOPIC_REPLICATION_FACTOR": "1",
        "LUMA_BRIDGE_SPOOL_DIR": tempfile.mkdtemp(prefix="bench-verify-spool-"),
        "LUMA_BRIDGE_DRAIN_DELAY": "0",
        "LUMA_BRIDGE_LOG_LEVEL": "ERROR",
        "LUMA_BRIDGE_VERIFY": mode,
        "LUMA_BRIDGE_LUMA_API_KEY": API_KEY,
        "LUMA_BRIDGE_LUMA_BASE_URL": api_url,
        "LUMA_BRIDGE_KAFKA_ACK_TIMEOUT": "3",
        "LUMA_BRIDGE_VERIFY_TIMEOUT": "1",
        # Sequential callbacks arrive faster than the default limit toward Luma allows.
        "LUMA_BRIDGE_VERIFY_RATE_LIMIT": "10000",
    }
    return env


@contextmanager
def running_bridge(env: dict[str, str], port: int) -> Iterator[None]:
    bridge = [sys.executable, "-m", "bridge"]
    # Our own CLI, fixed arguments.
    subprocess.run([*bridge, "topics", "create"], env=env, check=True, capture_output=True)  # noqa: S603
    process = subprocess.Popen([*bridge, "serve"], env=env)  # noqa: S603
    try:
        deadline = time.monotonic() + 60
        while not wait_for_port("127.0.0.1", port, time.monotonic() + 0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bridge did not start listening (see its output above)")
        yield
    finally:
        process.terminate()
        process.wait(30)


async def send(port: int, first: int, count: int) -> list[float]:
    """Answer times, in seconds, of `count` callbacks sent one after the other."""
    url = f"http://127.0.0.1:{port}/luma/callback/{TOKEN}"
    latencies = []
    async with aiohttp.ClientSession() as http:
        for number in range(first, first + count):
            body = json.dumps(generation(number)).encode()
            started = time.perf_counter()
            async with http.post(url, data=body, headers=JSON) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"callback answered {response.status}")
            latencies.append(time.perf_counter() - started)
    return latencies


def measure(count: int, warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Each mode `rounds` times, interleaved, so drift in the machine's load hits all alike."""
    per_run = count + warmup
    runs = rounds * len(MODES)
    latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
    with EmbeddedBroker() as broker, fake_api_in_thread(per_run * runs) as api_url:
        for run in range(runs):
            mode = MODES[run % len(MODES)]
            port = free_port()
            first = run * per_run
            with running_bridge(bridge_env(broker.bootstrap, mode, api_url, port), port):
                asyncio.run(send(port, first, warmup))
                latencies[mode] += asyncio.run(send(port, first + warmup, count))
            print(f"{mode}: {json.dumps(latency_summary_ms(latencies[mode]))}", flush=True)
    return {mode: latency_summary_ms(values) for mode, values in latencies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="callbacks measured per mode")
    parser.add_argument("--warmup", type=int, default=50, help="callbacks sent first, unmeasured")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, interleaved")
    args = parser.parse_args()
    summary = measure(args.count, args.warmup, args.rounds)
    record = {"count_per_mode": args.count * args.rounds, "modes": summary}
    RESULTS.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print("\n| mode | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|")
    for mode, numbers in summary.items():
        print(f"| {mode} | {numbers['p50']:.2f} | {numbers['p90']:.2f} | {numbers['p99']:.2f} |")


if __name__ == "__main__":
    main()
