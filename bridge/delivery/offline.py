"""A spool without its bridge: `spool inspect` (what it holds) and `spool drain` (send it).

For a spool left behind on a retained volume (a pod deleted on scale-down, a node lost):
a Job mounts the claim and runs `luma-kafka-bridge spool drain --spool-dir DIR`, which
sends the rows through the same ordered path the bridge uses and deletes each one Kafka
acknowledged. Never run it on a spool a running bridge is using.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bridge.delivery.lanes import Lanes
from bridge.delivery.publisher import KafkaPublisher
from bridge.delivery.spool import Spool
from bridge.ops.metrics import Metrics
from bridge.settings import Settings

log = logging.getLogger("bridge.delivery.offline")


async def inspect_spool(directory: Path) -> dict[str, Any]:
    """What the spool in `directory` holds: records per topic, disk bytes, the quarantine."""
    if not (directory / "spool.sqlite3").exists():
        raise FileNotFoundError(f"no spool in {directory} (expected {directory}/spool.sqlite3)")
    spool = Spool(directory, max_bytes=1 << 62, metrics=Metrics(CollectorRegistry()))
    await spool.open()
    try:
        return await spool.describe()
    finally:
        await spool.close()


@dataclass(frozen=True)
class DrainSummary:
    """What `spool drain` did."""

    records_before: int
    records_left: int
    quarantined: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def drain_spool(settings: Settings, *, within: float) -> DrainSummary:
    """Send every row of SPOOL_DIR to Kafka, in order, within `within` seconds.

    Raises `KafkaUnavailable` when Kafka cannot be reached at all.
    """
    directory = settings.spool_dir
    if not (directory / "spool.sqlite3").exists():
        raise FileNotFoundError(f"no spool in {directory} (expected {directory}/spool.sqlite3)")
    metrics = Metrics(CollectorRegistry())
    spool = Spool(directory, max_bytes=settings.spool_max_bytes, metrics=metrics)
    await spool.open()
    publisher = KafkaPublisher(settings, metrics=metrics)
    started = time.monotonic()
    before = spool.records
    try:
        await publisher.start()
        lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics)
        lanes.open()
        drainer = asyncio.create_task(lanes.run())
        try:
            await lanes.settle(started + within)
        finally:
            drainer.cancel()
            await asyncio.gather(drainer, return_exceptions=True)
    finally:
        await publisher.stop(timeout=5.0)
        left, quarantined = spool.records, spool.quarantined
        await spool.close()
    return DrainSummary(before, left, quarantined, round(time.monotonic() - started, 3))
