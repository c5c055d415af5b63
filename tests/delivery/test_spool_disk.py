"""A spool whose disk fills up (a 2 MiB tmpfs): answered 503, never 200, and it recovers by
itself once Kafka takes the records back and the space returns."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.contract.callback import Topics
from bridge.delivery.dedupe import DedupeWindow
from bridge.delivery.lanes import Lanes
from bridge.delivery.pipeline import Outcome, Pipeline
from bridge.delivery.spool import Spool
from bridge.ops.metrics import Metrics
from tests.conftest import unavailable
from tests.helpers import SEED_COMPLETED_VIDEO, MemoryPublisher, wait_until


@pytest.fixture
def small_disk() -> Iterator[Path]:
    mountpoint = Path(tempfile.mkdtemp(prefix="luma-bridge-small-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a small tmpfs (needs root): {mounted.stderr.decode()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        mountpoint.rmdir()


def body() -> bytes:
    callback = dict(SEED_COMPLETED_VIDEO, id=str(uuid.uuid4()))
    callback["request"] = dict(callback["request"], prompt="x" * 2_000)
    return json.dumps(callback).encode()


def fill(directory: Path) -> Path:
    """Take (nearly) all the free space of `directory`'s volume, as another writer would."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


async def test_a_full_disk_answers_503_and_recovers_by_itself(small_disk: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    # SPOOL_MAX_BYTES above the volume: only the disk itself can say no.
    spool = Spool(small_disk, max_bytes=64 << 20, metrics=metrics)
    await spool.open()
    publisher = MemoryPublisher()
    lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics)
    lanes.open()
    pipeline = Pipeline(
        publisher=publisher,
        topics=Topics("t"),
        metrics=metrics,
        ack_timeout=0.05,
        lifecycle=True,
        dedupe=DedupeWindow(size=1000, ttl=60),
        lanes=lanes,
    )
    drainer = asyncio.create_task(lanes.run())
    try:
        publisher.failing = "KafkaTimeoutError"  # Kafka away: everything goes to the spool
        before = await pipeline.handle(body(), datetime.now(UTC))
        assert before.outcome is Outcome.ACCEPTED
        filler = await asyncio.to_thread(fill, small_disk)
        outcomes = [(await pipeline.handle(body(), datetime.now(UTC))).outcome for _ in range(10)]
        assert outcomes == [Outcome.UNAVAILABLE] * 10  # 503, never a 200 it could not keep
        assert spool.records == 2
        assert metrics.registry.get_sample_value("luma_bridge_spool_write_errors_total")

        await asyncio.to_thread(filler.unlink)  # space returns
        after = await pipeline.handle(body(), datetime.now(UTC))
        assert after.outcome is Outcome.ACCEPTED
        assert after.spooled
        publisher.failing = None  # Kafka is back: the drainer empties the spool
        await wait_until(lambda: spool.records == 0, timeout=30, what="spool drained")
        assert len(publisher.records) == 4
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        await spool.close()
