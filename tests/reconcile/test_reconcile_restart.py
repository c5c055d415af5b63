"""Killing the reconciler mid-run, restarting it as two in one group, and moving partitions
between them writes no state twice; the API key is in none of their logs or metrics.

The reconcilers run as their own processes through the real CLI (`luma-kafka-bridge
reconcile`), against the real broker and the fake Luma API served by this test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.devtools.embedded import free_port
from bridge.devtools.fake_luma import FakeLumaAPI, SenderOptions, send_lifecycles
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import TOKEN, bridge_settings
from tests.reconcile.support import API_KEY, audit_lifecycle, bridge_on, header, read_all

pytestmark = pytest.mark.integration

GENERATIONS = 300
#: The Helm chart's terminationGracePeriodSeconds for the reconciler: after it, SIGKILL.
GRACE_SECONDS = 30


class ReconcilerProcess:
    """`luma-kafka-bridge reconcile` in a subprocess, its log in a file."""

    def __init__(self, settings: Settings, api: FakeLumaAPI, name: str) -> None:
        self.name = name
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
            "LUMA_BRIDGE_PUBLIC_URL": settings.public_url or "",
            "LUMA_BRIDGE_RECONCILE_AFTER_SECONDS": "1",
            "LUMA_BRIDGE_RECONCILE_INTERVAL_SECONDS": "1",
            # Slow enough that the kill lands in the middle of the work.
            "LUMA_BRIDGE_LUMA_API_RATE_LIMIT": "12",
            "LUMA_BRIDGE_LOG_FORMAT": "json",
        }
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "reconcile"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

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
            log = self.log_path.read_text(errors="replace")[-4000:]
            raise AssertionError(
                f"the {self.name} reconciler did not stop within {GRACE_SECONDS}s of SIGTERM; "
                f"its log ends:\n{log}"
            ) from None

    def close(self) -> str:
        if self.process.poll() is None:
            self.kill()
        self._log.close()
        return self.log_path.read_text(errors="replace")


async def reconciler_records(settings: Settings) -> int:
    records = await read_all(settings.kafka_bootstrap_servers, f"{settings.topic_prefix}.lifecycle")
    return sum(1 for r in records if header(r, "luma-source") == "reconciler")


async def wait_for(condition: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(1.0)


async def test_kill_restart_and_partition_moves_write_nothing_twice(
    kafka_broker: KafkaBroker,
) -> None:
    port = free_port()
    processes: list[ReconcilerProcess] = []
    logs: list[str] = []
    async with FakeLumaAPI(api_key=API_KEY, seed=3) as api:
        settings = bridge_settings(
            kafka_broker.bootstrap,
            kafka_broker.supports_idempotence,
            port=port,
            topic_partitions=3,
            public_url=f"http://127.0.0.1:{port}/luma/callback",
            kafka_client_id=f"restart-test-{port}",
        )
        options = SenderOptions(
            callback_url=f"http://127.0.0.1:{port}{settings.callback_path}/{TOKEN}",
            count=GENERATIONS,
            drop_ratio=0.6,
            drop_all_ratio=0.25,
            foreign_ratio=0.05,
            step_seconds=0.2,
            rate=100.0,
            seed=5,
        )
        async with bridge_on(settings, create=True):
            report = await send_lifecycles(api, options)
        try:
            first = ReconcilerProcess(settings, api, "first")
            processes.append(first)
            await wait_for(
                lambda: _at_least(settings, 25), timeout=120, what="the first reconciler's writes"
            )
            first.kill()
            written_before_kill = await reconciler_records(settings)

            # Two in one group: the partitions are split between them, then all move to one.
            second = ReconcilerProcess(settings, api, "second")
            third = ReconcilerProcess(settings, api, "third")
            processes += [second, third]
            await wait_for(
                lambda: _at_least(settings, written_before_kill + 25),
                timeout=120,
                what="writes after the restart",
            )
            assert await second.terminate() == 0
            records: list[Any] = []

            async def complete() -> bool:
                nonlocal records
                records = await read_all(
                    settings.kafka_bootstrap_servers, f"{settings.topic_prefix}.lifecycle"
                )
                return audit_lifecycle(records, api.generations, report.ours).complete

            await wait_for(complete, timeout=240, what="every lifecycle to complete")
            metrics = await _scrape(third.admin_port)
            # Luma's API stops answering: the stop must not wait through its retries.
            api.stop_answering()
            await wait_for(_held_by(api), timeout=30, what="a request to the silent Luma API")
            assert await third.terminate() == 0
            api.answer_again()
        finally:
            logs = [process.close() for process in processes]

    audit = audit_lifecycle(records, api.generations, report.ours)
    assert audit.out_of_order == []
    assert audit.foreign_written == []
    assert audit.written_twice_by_reconciler == []
    by_state = [
        (r.key.decode(), header(r, "luma-state"))
        for r in records
        if header(r, "luma-source") == "reconciler"
    ]
    assert len(by_state) == len(set(by_state)), "a state was written twice by the reconcilers"
    assert written_before_kill < audit.reconciler_records
    assert "luma_bridge_reconciler_records_written_total" in metrics
    for text in [*logs, metrics]:
        assert API_KEY not in text
    assert all("partitions taken over" in text for text in logs)


async def _at_least(settings: Settings, count: int) -> bool:
    return await reconciler_records(settings) >= count


def _held_by(api: FakeLumaAPI) -> Callable[[], Awaitable[bool]]:
    async def held() -> bool:
        return api.held > 0

    return held


async def _scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.text()
