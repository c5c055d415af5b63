"""The Kafka limit: the raw aiokafka producer writing the bridge's records, no HTTP.

Each "callback" is what the bridge writes for one: the per-state and the lifecycle
record, same key, value and headers, acks=all, the bridge's default producer
settings; `--concurrency` callbacks are in flight at once (closed loop, like wrk's
connections). With `--rate R` the callbacks arrive open loop instead, R per second
spread evenly (each measured from its intended start), which shows how batching in
the producer changes with the arrival pattern, without HTTP. Prints one JSON line:
callbacks, seconds, latency percentiles, the CPU seconds this process used while
measuring, and the produce requests sent per callback.
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
    _count_sends(producer)
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

    async def one(number: int, intended: float) -> None:
        prefix, suffix = templates[number % len(templates)]
        key = generation_id(0, number)
        value = prefix + key + suffix
        state = STATES[number % len(templates)]
        headers = [
            ("content-type", b"application/json"),
            ("luma-event-id", key),
            ("luma-state", state),
            ("luma-received-at", b"2026-05-30T12:34:56.000Z"),
            ("luma-generation-type", b"video"),
        ]
        futures = [
            await producer.send(f"{args.prefix}.{state.decode()}", value, key=key, headers=headers),
            await producer.send(f"{args.prefix}.lifecycle", value, key=key, headers=headers),
        ]
        await asyncio.gather(*futures)
        if measuring:
            latencies.append(time.perf_counter() - intended)

    async def paced() -> None:
        started = time.perf_counter()
        running: set[asyncio.Task[None]] = set()
        number = 0
        while time.monotonic() < stop_at:
            intended = started + number / args.rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(number, intended))
            running.add(task)
            task.add_done_callback(running.discard)
            number += 1
        await asyncio.gather(*running)

    requests_before = _produce_requests(producer)
    if args.rate:
        tasks = [asyncio.create_task(paced())]
    else:
        tasks = [asyncio.create_task(worker(n)) for n in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    measuring = True
    requests_before = _produce_requests(producer)
    cpu0, t0 = os.times(), time.monotonic()
    await asyncio.gather(*tasks)
    cpu1, t1 = os.times(), time.monotonic()
    produce_requests = _produce_requests(producer) - requests_before
    await producer.stop()
    elapsed = t1 - t0
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "rps": len(latencies) / elapsed,
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "latency_ms": latency_summary_ms(latencies),
        "errors": {"total": 0},
        "produce_requests_per_callback": produce_requests / max(1, len(latencies)),
    }


def _produce_requests(producer: AIOKafkaProducer) -> int:
    """Produce requests the producer's sender has sent so far (counted by `_count_sends`)."""
    return int(getattr(producer, "_bench_produce_requests", 0))


def _count_sends(producer: AIOKafkaProducer) -> None:
    """Count the produce requests aiokafka sends: it exposes no counter, so its sender's
    one method that sends a request is wrapped (a benchmark's instrument, not the bridge's)."""
    sender = producer._sender
    original = sender._send_produce_req

    def counted(*args: object, **kwargs: object) -> object:
        producer._bench_produce_requests = _produce_requests(producer) + 1  # type: ignore[attr-defined]
        return original(*args, **kwargs)

    sender._send_produce_req = counted


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
    parser.add_argument(
        "--rate", type=float, default=0.0, help="open loop: callbacks per second (0: closed)"
    )
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
