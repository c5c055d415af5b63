"""Shared by the reconciler tests: what Kafka holds, audited against Luma's truth."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from bridge.contract.callback import STATE_RANK, Topics
from bridge.devtools.embedded import free_port
from bridge.devtools.fake_luma import FakeLumaAPI
from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.helpers import AdminProcess, consume, running_bridge

API_KEY = "luma-test-key-5f0c2b9e7a1d4e8f"
#: The Helm chart's terminationGracePeriodSeconds for the reconciler by default: then SIGKILL.
GRACE_SECONDS = 30


def header(record: ConsumerRecord, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode()
    return None


async def read_all(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Everything on `topic` now: read until a poll brings nothing new."""
    return await consume(bootstrap, topic, done=lambda _, idle: idle, timeout=60.0)


@dataclass
class LifecycleAudit:
    """The lifecycle topic checked against what Luma's API says happened."""

    incomplete: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    foreign_written: list[str] = field(default_factory=list)
    written_twice_by_reconciler: list[tuple[str, str]] = field(default_factory=list)
    reconciler_records: int = 0
    callback_records: int = 0

    @property
    def complete(self) -> bool:
        return not self.incomplete


def audit_lifecycle(
    records: list[ConsumerRecord], truth: dict[str, dict[str, Any]], ours: list[str]
) -> LifecycleAudit:
    """Per generation of ours: its final state present, states in order; foreign: absent."""
    states: dict[str, list[str]] = defaultdict(list)
    by_reconciler: Counter[tuple[str, str]] = Counter()
    audit = LifecycleAudit()
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        generation_id = record.key.decode()
        state = header(record, "luma-state") or ""
        states[generation_id].append(state)
        if header(record, "luma-source") == "reconciler":
            audit.reconciler_records += 1
            by_reconciler[(generation_id, header(record, "luma-transition-id") or "")] += 1
        else:
            audit.callback_records += 1
    audit.written_twice_by_reconciler = [key for key, n in by_reconciler.items() if n > 1]
    ours_set = set(ours)
    audit.foreign_written = sorted(g for g in states if g not in ours_set)
    for generation_id in ours:
        seen = states.get(generation_id, [])
        final = truth[generation_id]["state"]
        if not seen or seen[-1] != final:
            audit.incomplete.append(generation_id)
        ranks = [STATE_RANK[s] for s in seen]
        if ranks != sorted(ranks):
            audit.out_of_order.append(generation_id)
    return audit


async def wait_for_complete_lifecycles(
    settings: Settings, api: FakeLumaAPI, ours: list[str], *, timeout: float
) -> tuple[LifecycleAudit, list[ConsumerRecord]]:
    """Follow the lifecycle topic until every generation of ours has its final state.

    Returns the audit of everything read, complete or not once `timeout` passed.
    """
    consumer = AIOKafkaConsumer(
        Topics(settings.topic_prefix).lifecycle,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    finals = {generation_id: api.generations[generation_id]["state"] for generation_id in ours}
    last: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                for record in partition_records:
                    records.append(record)
                    last[record.key.decode()] = header(record, "luma-state") or ""
            if all(last.get(generation_id) == final for generation_id, final in finals.items()):
                break
    finally:
        await consumer.stop()
    return audit_lifecycle(records, api.generations, ours), records


@asynccontextmanager
async def bridge_on(settings: Settings, *, create: bool) -> AsyncIterator[BridgeServer]:
    async with running_bridge(settings, create=create) as server:
        yield server


class ReconcilerProcess(AdminProcess):
    """`luma-kafka-bridge reconcile` in a subprocess, its log in a file."""

    process: subprocess.Popen[bytes]

    def __init__(self, settings: Settings, api: FakeLumaAPI, name: str, **extra_env: str) -> None:
        self.name = f"the {name} reconciler"
        self.admin_port = free_port()
        self.log_path = Path(tempfile.mkdtemp(prefix="reconciler-")) / f"{name}.log"
        env = {
            **os.environ,
            "LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "LUMA_BRIDGE_KAFKA_ENABLE_IDEMPOTENCE": str(settings.kafka_enable_idempotence),
            "LUMA_BRIDGE_KAFKA_CLIENT_ID": settings.kafka_client_id,
            "LUMA_BRIDGE_TOPIC_PREFIX": settings.topic_prefix,
            "LUMA_BRIDGE_TOPIC_REPLICATION_FACTOR": "1",
            "LUMA_BRIDGE_HOST": "127.0.0.1",
            "LUMA_BRIDGE_ADMIN_PORT": str(self.admin_port),
            "LUMA_BRIDGE_LUMA_API_KEY": API_KEY,
            "LUMA_BRIDGE_LUMA_BASE_URL": api.base_url,
            "LUMA_BRIDGE_RECONCILE_AFTER_SECONDS": "1",
            "LUMA_BRIDGE_RECONCILE_INTERVAL_SECONDS": "1",
            # Slow enough that the kill lands in the middle of the work.
            "LUMA_BRIDGE_LUMA_API_RATE_LIMIT": "12",
            "LUMA_BRIDGE_LOG_FORMAT": "json",
            **({"LUMA_BRIDGE_PUBLIC_URL": settings.public_url} if settings.public_url else {}),
            **extra_env,
        }
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "reconcile"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    async def terminate(self) -> int:
        """SIGTERM, then the exit code. Waited for off the event loop, which serves the fake
        Luma API the reconciler may be asking."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not stop within {GRACE_SECONDS}s of SIGTERM; "
                f"its log ends:\n{self.log_text()}"
            ) from None

    def close(self) -> str:
        if self.process.poll() is None:
            self.kill()
        self._log.close()
        return self.log_path.read_text(errors="replace")
