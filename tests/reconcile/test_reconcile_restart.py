"""Killing the reconciler mid-run, restarting it as two in one group, and moving partitions
between them writes no state twice; the API key is in none of their logs or metrics.

The reconcilers run as their own processes through the real CLI (`luma-kafka-bridge
reconcile`), against the real broker and the fake Luma API served by this test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bridge.devtools.embedded import free_port
from bridge.devtools.fake_luma import FakeLumaAPI, SenderOptions, send_lifecycles
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import TOKEN, bridge_settings
from tests.reconcile.support import (
    API_KEY,
    ReconcilerProcess,
    audit_lifecycle,
    bridge_on,
    header,
    read_all,
)

pytestmark = pytest.mark.integration

GENERATIONS = 300


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
            metrics = await third.metrics()
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
