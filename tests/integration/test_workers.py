"""`serve --workers 2` through the CLI on the embedded broker: one port, two processes,
metrics that add up, and the spool of a worker that is gone drained by the next start.

A generation's callbacks may reach either worker, as they may reach either of two
replicas, so these scenarios audit what was answered 200 for loss, not for order.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker
from bridge.settings import load_settings
from tests.faults.harness import (
    BridgeProcess,
    audit_lifecycle,
    frozen,
    lifecycle_records,
    new_prefix,
    run_load,
)
from tests.helpers import wait_until


async def per_worker(bridge: BridgeProcess, name: str, **labels: str) -> dict[str, float]:
    """`name`'s value per worker label, summed over other labels, from the supervisor."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{bridge.admin_port}/metrics") as response,
    ):
        text = await response.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                worker = sample.labels["worker"]
                values[worker] = values.get(worker, 0.0) + sample.value
    return values


async def started(
    broker: EmbeddedBroker, spool: Path, prefix: str, **settings: object
) -> BridgeProcess:
    await create_topics(
        load_settings(
            kafka_bootstrap_servers=broker.bootstrap,
            topic_prefix=prefix,
            topic_replication_factor=1,
            topic_partitions=3,
        )
    )
    bridge = BridgeProcess(broker.bootstrap, spool_dir=spool, prefix=prefix, **settings)
    bridge.start()
    await bridge.wait_ready(timeout=60)
    return bridge


async def test_two_workers_share_the_port_and_their_metrics_add_up(
    own_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    prefix = new_prefix()
    bridge = await started(own_broker, tmp_path, prefix, workers=2)
    try:
        summary, arrivals = await run_load(bridge.url, 100, rate=50)
        accepted = await per_worker(bridge, "luma_bridge_callbacks_total", outcome="accepted")
        assert set(accepted) == {"0", "1"}
        assert min(accepted.values()) > 0, accepted  # the kernel gave each worker connections
        # Each acknowledged callback was accepted once, or more: a retry that reaches the
        # other worker is new to that worker's dedupe window, as to another replica's.
        assert sum(accepted.values()) >= len({a.event_id for a in arrivals}), (accepted, summary)
        expect = {a.event_id for a in arrivals}
        records = await lifecycle_records(
            own_broker.bootstrap, f"{prefix}.lifecycle", expect=expect
        )
        assert audit_lifecycle(records, arrivals).missing == 0
        bridge.signal(signal.SIGTERM)
        assert await asyncio.to_thread(bridge.wait, 40) == 0
    finally:
        bridge.stop()


async def test_a_lowered_worker_count_drains_the_spool_of_the_worker_gone(
    own_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    prefix = new_prefix()
    quick = {"kafka_ack_timeout": 0.5, "shutdown_timeout": 5}
    two = await started(own_broker, tmp_path, prefix, workers=2, **quick)
    try:
        with frozen(own_broker):
            _, arrivals = await run_load(two.url, 40, rate=40)
            spooled = await per_worker(two, "luma_bridge_spool_records")
            assert set(spooled) == {"0", "1"}
            assert min(spooled.values()) > 0, spooled
            two.signal(signal.SIGTERM)  # Kafka still away: each worker keeps its spool
            assert await asyncio.to_thread(two.wait, 30) == 0
    finally:
        two.stop()
    assert (tmp_path / "worker-1" / "spool.sqlite3").exists()
    one = await started(own_broker, tmp_path, prefix, **quick)
    try:
        await wait_until(
            lambda: not (tmp_path / "worker-1").exists(),
            timeout=90,
            what="the gone worker's spool drained and removed",
        )
        expect = {a.event_id for a in arrivals}
        records = await lifecycle_records(
            own_broker.bootstrap, f"{prefix}.lifecycle", expect=expect
        )
        assert audit_lifecycle(records, arrivals).missing == 0
    finally:
        one.stop()
