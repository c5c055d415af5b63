"""The Kafka limit: the raw aiokafka producer writing the bridge's records, no HTTP.

Each "callback" is what the bridge writes for one: the per-state and the lifecycle
record, same key, value and headers, acks=all, the bridge's default producer
settings; `--concurrency` callbacks are in flight at once (closed loop, like wrk's
connections). Prints one JSON line: callbacks, seconds, latency percentiles and the
CPU seconds this process used while measuring.
Run: python -m bench.rawproducer --bootstrap 127.0.0.1:9092 --templates F --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.payloads import generation_id, load_templates
from bench.stats import latency_summary_ms

STATES = (b"queued", b"dreaming", b"completed")


async def run(args: argparse.Namespace) -> dict[str, object]:
    templates = load_templates(Path(args.templates))
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=args.linger_ms,
        max_batch_size=args.max_batch_size,
        compression_type=args.compression,
    )
    await producer.start()
    latencies: list[float] = []
    measuring = False
    stop_at = time.monotonic() + args.warmup + args.duration

    async def worker(number: int) -> None:
        counter = 0
        while time.monotonic() < stop_at:
            counter += 1
            index = counter % len(templates)
            prefix, suffix = templates[index]
            key = generation_id(number, counter)
            value = prefix + key + suffix
            state = STATES[index]
            headers = [
                ("content-type", b"application/json"),
                ("luma-event-id", key),
                ("luma-state", state),
                ("luma-received-at", b"2026-05-30T12:34:56.000Z"),
                ("luma-generation-type", b"video"),
            ]
            started = time.perf_counter()
            futures = [
                await producer.send(
                    f"{args.prefix}.{state.decode()}", value, key=key, headers=headers
                ),
                await producer.send(f"{args.prefix}.lifecycle", value, key=key, headers=headers),
            ]
            await asyncio.gather(*futures)
            if measuring:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(worker(n)) for n in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    measuring = True
    cpu0, t0 = os.times(), time.monotonic()
    await asyncio.gather(*tasks)
    cpu1, t1 = os.times(), time.monotonic()
    await producer.stop()
    elapsed = t1 - t0
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "rps": len(latencies) / elapsed,
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "latency_ms": latency_summary_ms(latencies),
        "errors": {"total": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--templates", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--prefix", default="luma.generation")
    parser.add_argument("--linger-ms", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=65536)
    parser.add_argument("--compression", default=None)
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
