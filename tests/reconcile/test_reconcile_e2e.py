"""The reconciler's promise against a real broker: every lifecycle complete, in order, nothing
foreign, nothing written twice, even when the bridge was down and callbacks were dropped.

The shape is the issue's: 1,000 generations, 20 % of them losing one or more callbacks
(a quarter of those every callback), a share submitted by another system, and the
bridge down in the middle while Luma keeps sending. CI scales time down (short states,
a 5 s outage); `RECONCILE_E2E_REAL=1` runs the real-size outage of 60 s, whose numbers
the README reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bridge.contract.callback import Topics
from bridge.devtools.embedded import free_port
from bridge.devtools.fake_luma import FakeLumaAPI, SenderOptions, SenderReport, send_lifecycles
from bridge.reconcile.service import ReconcilerService
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import TOKEN, bridge_settings
from tests.reconcile.support import (
    API_KEY,
    bridge_on,
    header,
    read_all,
    wait_for_complete_lifecycles,
)

pytestmark = pytest.mark.integration

REAL = os.environ.get("RECONCILE_E2E_REAL") == "1"
GENERATIONS = 1000
# (generations started per second, seconds per state, outage starts after, outage lasts,
#  reconcile after)
SHAPE = (10.0, 3.0, 40.0, 60.0, 15.0) if REAL else (100.0, 0.5, 4.0, 5.0, 3.0)


def reconcile_settings(broker: KafkaBroker, port: int, api: FakeLumaAPI, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "port": port,
        "topic_partitions": 3,
        "luma_api_key": API_KEY,
        "luma_base_url": api.base_url,
        "public_url": f"http://127.0.0.1:{port}/luma/callback",
        "reconcile_interval_seconds": 1.0,
        "luma_api_rate_limit": 500.0,
        "reconcile_lookback_seconds": 3600.0,
        "kafka_client_id": f"reconcile-test-{port}",
    }
    values.update(extra)
    return bridge_settings(broker.bootstrap, broker.supports_idempotence, **values)


async def test_every_lifecycle_completes_despite_lost_callbacks_and_an_outage(
    kafka_broker: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rate, step, outage_at, outage, after = SHAPE
    port = free_port()
    async with FakeLumaAPI(api_key=API_KEY, seed=7) as api:
        settings = reconcile_settings(kafka_broker, port, api, reconcile_after_seconds=after)
        registry = CollectorRegistry()
        callback_url = f"http://127.0.0.1:{port}{settings.callback_path}/{TOKEN}"
        options = SenderOptions(
            callback_url=callback_url,
            count=GENERATIONS,
            drop_ratio=0.2,
            drop_all_ratio=0.25,
            foreign_ratio=0.05,
            step_seconds=step,
            rate=rate,
            seed=11,
        )
        started = time.monotonic()
        service = ReconcilerService(settings, registry=registry)
        stopping = asyncio.Event()
        sending: asyncio.Task[SenderReport] | None = None
        running: asyncio.Task[None] | None = None
        try:
            async with bridge_on(settings, create=True):
                await service.start()
                running = asyncio.create_task(service.reconciler.run(stopping))
                sending = asyncio.create_task(send_lifecycles(api, options))
                await asyncio.sleep(outage_at)
            # The bridge is down: Luma's retries fail within a fraction of a second.
            await asyncio.sleep(outage)
            async with bridge_on(settings, create=False):
                report = await sending
                sent_at = time.monotonic()
                audit, records = await wait_for_complete_lifecycles(
                    settings, api, report.ours, timeout=300.0
                )
                completed_at = time.monotonic()
        finally:
            stopping.set()
            if sending is not None:
                sending.cancel()
            if running is not None:
                await running
            await service.stop()

    # Callbacks really were lost: the dropped 20 %, and the outage's give-ups.
    assert len(report.dropped) >= 0.15 * len(report.ours)
    assert any(len(states) == 3 for states in report.dropped.values())
    assert report.gave_up, "the outage must have cost callbacks"
    assert audit.complete, f"{len(audit.incomplete)} lifecycles incomplete: {audit.incomplete[:5]}"
    assert audit.out_of_order == []
    assert audit.foreign_written == [], "generations of another system were written"
    assert audit.written_twice_by_reconciler == []
    assert audit.reconciler_records > 0

    # Per-state topics hold the reconciled states too, and no value carries the write token.
    prefix = Topics(settings.topic_prefix)
    completed = await read_all(settings.kafka_bootstrap_servers, prefix.for_state("completed"))
    failed = await read_all(settings.kafka_bootstrap_servers, prefix.for_state("failed"))
    finals = {r.key.decode() for r in completed + failed}
    assert set(report.ours) <= finals
    reconciled = [r for r in records if header(r, "luma-source") == "reconciler"]
    # The receiver's own redaction is the edge's (issue 6); the reconciler redacts what it writes.
    assert all(TOKEN.encode() not in r.value for r in reconciled)
    assert all(b"/luma/callback/REDACTED" in r.value for r in reconciled)
    assert all(header(r, "luma-transition-id") for r in records)

    written = sum(
        value
        for (name, labels, value) in _samples(
            registry, "luma_bridge_reconciler_records_written_total"
        )
    )
    assert written == len(reconciled)

    exposition = generate_latest(registry).decode()
    assert API_KEY not in exposition
    assert API_KEY not in caplog.text

    numbers = {
        "generations": GENERATIONS,
        "ours": len(report.ours),
        "foreign": len(report.foreign),
        **report.as_dict(),
        "reconciler_records": audit.reconciler_records,
        "callback_records": audit.callback_records,
        "outage_s": outage,
        "reconcile_after_s": after,
        "seconds_from_last_callback_to_complete": round(completed_at - sent_at, 1),
        "total_seconds": round(completed_at - started, 1),
    }
    print("RECONCILE-E2E " + json.dumps(numbers))


def _samples(registry: CollectorRegistry, name: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    ]
