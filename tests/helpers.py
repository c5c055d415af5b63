"""Test helpers: an in-memory publisher, an in-process bridge, and a Kafka reader."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiokafka.errors
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from prometheus_client import CollectorRegistry

from bridge.delivery.publisher import Placement, Record, wait_all
from bridge.delivery.topics import create_topics, missing_topics
from bridge.server import BridgeServer
from bridge.settings import Settings, load_settings

TOKEN = "test-token-0123456789"

SEED_COMPLETED_VIDEO: dict[str, Any] = {
    "id": "d1ad97c4-9d8f-4e3a-9c2e-3b8c0b9b1e2a",
    "state": "completed",
    "failure_reason": None,
    "created_at": "2026-05-30T12:34:56.000Z",
    "assets": {"video": "https://storage.cdn-luma.com/.../generation.mp4"},
    "version": "ray-2",
    "request": {
        "prompt": "A teddy bear in sunglasses playing electric guitar and dancing",
        "aspect_ratio": "16:9",
        "loop": False,
    },
}
SEED_FAILED_VIDEO: dict[str, Any] = {
    "id": "fbb8c4c1-6f0a-4f9d-8a64-4c6c1f6c9f00",
    "state": "failed",
    "failure_reason": "Generation failed due to invalid keyframe asset.",
    "created_at": "2026-05-30T12:34:56.000Z",
    "assets": None,
    "request": {"prompt": "A surfer riding a wave at sunset"},
}


async def wait_until(
    condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def git(where: Path, *args: str) -> str:
    """Run git in `where` (a throw-away repository of a test), as a test author; its output."""
    done = subprocess.run(
        ["git", "-C", str(where), "-c", "user.name=test", "-c", "user.email=test@test", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def child_environment(**values: str) -> dict[str, str]:
    """Exactly `values` for a child process, plus coverage.py's own variables, so that under
    `make test` the child is measured too."""
    measured = {name: value for name, value in os.environ.items() if name.startswith("COVERAGE_")}
    return {**measured, **values}


class MemoryPublisher:
    """A `Publisher` for unit tests: keeps records in a list; can fail or stall on demand.

    `failing` names an aiokafka error class every send fails with; while `gate` is an
    unset event, sends stay pending until it is set.
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.failing: str | None = None
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.renewals = 0

    def send(self, records: Sequence[Record]) -> list[asyncio.Future[Placement]]:
        self.calls += 1
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Placement]] = [loop.create_future() for _ in records]
        if self.gate is not None and not self.gate.is_set():
            gate = self.gate
            task = asyncio.ensure_future(gate.wait())
            task.add_done_callback(lambda _: self._settle(records, futures))
        else:
            self._settle(records, futures)
        return futures

    def _settle(self, records: Sequence[Record], futures: list[asyncio.Future[Placement]]) -> None:
        for record, future in zip(records, futures, strict=True):
            if future.done():
                continue
            if self.failing:
                future.set_exception(getattr(aiokafka.errors, self.failing)())
                continue
            self.records.append(record)
            future.set_result(Placement(record.topic, 0, len(self.records) - 1))

    async def publish(self, records: Sequence[Record], ack_timeout: float) -> list[Placement]:
        return await wait_all(self.send(records), ack_timeout)

    async def check_connection(self, within: float) -> bool:
        return self.failing is None

    async def find(self, records: Sequence[Record], since_ms: int, within: float) -> list[bool]:
        return [record in self.records for record in records]

    async def renew(self) -> None:
        self.renewals += 1


def bridge_settings(bootstrap: str, idempotence: bool, **overrides: Any) -> Settings:
    """Settings for an in-process bridge with its own topic prefix and free ports."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_enable_idempotence": idempotence,
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "auth_tokens": TOKEN,
        "topic_prefix": f"test.{uuid.uuid4().hex[:12]}",
        "topic_replication_factor": 1,
        "topic_partitions": 2,
        "drain_delay": 0,
        "spool_dir": tempfile.mkdtemp(prefix="luma-bridge-test-spool-"),
        "shutdown_timeout": 10,
    }
    values.update(overrides)
    return load_settings(**values)


async def topics_visible(settings: Settings, timeout: float = 30.0) -> None:
    """Wait until every required topic shows in the metadata.

    KRaft brokers learn of a created topic from the metadata log a moment after
    CreateTopics has answered, so a start-up check right after creation may miss it.
    """
    deadline = time.monotonic() + timeout
    while missing := await missing_topics(settings):
        if time.monotonic() > deadline:
            raise AssertionError(f"topics {missing} not in the metadata after {timeout}s")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def running_bridge(settings: Settings, *, create: bool = True) -> AsyncIterator[BridgeServer]:
    """A bridge served in this process, its topics created first."""
    if create:
        await create_topics(settings)
        await topics_visible(settings)
    server = BridgeServer(settings, registry=CollectorRegistry())
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


def callback_url(server: BridgeServer, token: str = TOKEN) -> str:
    return f"http://127.0.0.1:{server.callback_port}{server.settings.callback_path}/{token}"


async def consume(
    bootstrap: str,
    topic: str,
    *,
    done: Callable[[list[ConsumerRecord], bool], bool],
    timeout: float,
) -> list[ConsumerRecord]:
    """Read `topic` from the start until `done(records, idle)` or `timeout`.

    `idle` is true when the last poll brought nothing new.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for partition_records in batch.values():
                records.extend(partition_records)
            if done(records, not batch):
                break
    finally:
        await consumer.stop()
    return records


async def read_topic(
    bootstrap: str, topic: str, *, expected: int, timeout: float = 15.0
) -> list[ConsumerRecord]:
    """Read `topic` from the start until `expected` records arrive (fails after `timeout`).

    With expected=0, reads for `timeout` and returns what is there (to prove absence,
    after a marker record proved that later writes are visible).
    """
    records = await consume(
        bootstrap,
        topic,
        done=lambda rs, _: bool(expected) and len(rs) >= expected,
        timeout=timeout,
    )
    if len(records) < expected:
        raise AssertionError(f"{topic}: expected {expected} records, read {len(records)}")
    return records


class AdminProcess:
    """A bridge or reconciler run as its own process, seen through its admin listener.

    Subclasses set `name` (for messages), `admin_port` and `process` (None until started),
    and say what their log ends with (`log_text`).
    """

    name: str
    admin_port: int
    process: subprocess.Popen[bytes] | None

    def log_text(self) -> str:
        raise NotImplementedError

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise AssertionError(f"{self.name} exited early: {self.log_text()}")
                try:
                    async with http.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout}s: {self.log_text()}")

    async def metrics(self) -> str:
        """What `/metrics` says now."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.admin_port}/metrics") as response,
        ):
            assert response.status == 200
            return await response.text()

    async def metric(self, name: str) -> float:
        """The current value of an unlabelled metric."""
        for line in (await self.metrics()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exported")

    async def wait_for_metric(self, name: str, at_least: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.metric(name) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed below {at_least} for {timeout}s")
            await asyncio.sleep(0.05)
