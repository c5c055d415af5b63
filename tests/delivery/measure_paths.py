"""Measure the two delivery designs on this machine: the lanes' fast path (Kafka `acks=all`,
no disk) against spool-first (an fsync before every answer). docs/delivery.md quotes it.

Run: `.venv/bin/python -m tests.delivery.measure_paths` (starts its own embedded broker).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from bridge.delivery.lanes import Lanes
from bridge.delivery.publisher import KafkaPublisher, Record
from bridge.delivery.spool import Spool
from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker
from bridge.ops.metrics import Metrics
from bridge.settings import load_settings

CALLBACKS, CONCURRENCY = 3000, 16
VALUE = b"x" * 900

Write = Callable[[list[Record]], Awaitable[object]]


def records(n: int) -> list[Record]:
    key = f"g{n}".encode()
    headers = [("luma-event-id", uuid.uuid4().hex.encode()), ("luma-state", b"queued")]
    return [Record("m.queued", key, VALUE, headers), Record("m.lifecycle", key, VALUE, headers)]


async def measure(write: Write) -> dict[str, float]:
    latencies: list[float] = []
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(n: int) -> None:
        async with gate:
            started = time.perf_counter()
            await write(records(n))
            latencies.append(time.perf_counter() - started)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(CALLBACKS)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    latencies.sort()
    return {
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "cpu_ms_per_callback": round(cpu / CALLBACKS * 1000, 3),
        "callbacks_per_s": round(CALLBACKS / wall),
    }


async def main() -> None:
    with EmbeddedBroker() as broker:
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap,
            kafka_enable_idempotence=False,
            topic_prefix="m",
            topic_replication_factor=1,
            topic_partitions=3,
        )
        await create_topics(settings)
        metrics = Metrics(CollectorRegistry())
        publisher = KafkaPublisher(settings, metrics=metrics)
        await publisher.start()
        spool = Spool(Path(tempfile.mkdtemp()), max_bytes=1 << 30, metrics=metrics)
        await spool.open()
        lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics)

        async def fast_path(batch: list[Record]) -> object:
            return await lanes.write(batch, 4.0)

        async def spool_first(batch: list[Record]) -> object:
            first = spool.next_seqs(len(batch))
            await spool.append([(first + n, r) for n, r in enumerate(batch)])
            return None

        await measure(fast_path)  # warm-up: connections, metadata
        results = {"lanes fast path": await measure(fast_path)}
        results["spool-first fsync alone"] = await measure(spool_first)
        await spool.close()
        await publisher.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
