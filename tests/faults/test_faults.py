"""Durability under faults: zero callbacks answered 200 may be missing from Kafka afterwards.

Each scenario runs the bridge as its own process (the real CLI), the broker as another,
drives load with `simulate` (Luma's retries included) and audits every event id answered
200 against what a consumer reads from the lifecycle topic. `FAULT_OUTAGE_SECONDS`
(default 5) sets the outage length; `make faults` runs them with Luma-scale outages
(30 s) and writes the numbers to `FAULT_REPORT`.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError, free_port
from bridge.settings import load_settings
from tests.conftest import unavailable
from tests.faults.harness import (
    BridgeProcess,
    DelayingProxy,
    audit,
    event_ids_in_kafka,
    frozen,
    new_prefix,
    run_simulate,
)

pytestmark = pytest.mark.faults

OUTAGE = float(os.environ.get("FAULT_OUTAGE_SECONDS", "5"))


@pytest.fixture
def broker(own_broker: EmbeddedBroker) -> EmbeddedBroker:
    """A broker of the scenario's own: it gets frozen."""
    return own_broker


@pytest.fixture
def prefix() -> str:
    return new_prefix()


async def make_topics(bootstrap: str, prefix: str) -> None:
    await create_topics(
        load_settings(
            kafka_bootstrap_servers=bootstrap,
            topic_prefix=prefix,
            topic_replication_factor=1,
            topic_partitions=3,
        )
    )


@pytest.fixture
async def bridge(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[BridgeProcess]:
    await make_topics(broker.bootstrap, prefix)
    settings = getattr(request, "param", {})
    process = BridgeProcess(broker.bootstrap, spool_dir=tmp_path, prefix=prefix, **settings)
    process.start()
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


async def wait_until_accepted(bridge: BridgeProcess, at_least: int, timeout: float = 60) -> None:
    """Until the bridge has accepted `at_least` callbacks (any state), from its /metrics."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{bridge.admin_port}/metrics") as response,
        ):
            text = await response.text()
        accepted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("luma_bridge_callbacks_total{") and 'outcome="accepted"' in line
        )
        if accepted >= at_least:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {accepted} callbacks accepted after {timeout}s")
        await asyncio.sleep(0.1)


async def check(
    scenario: str, bootstrap: str, prefix: str, summary: dict[str, Any], acked: list[str]
) -> None:
    found = await event_ids_in_kafka(bootstrap, f"{prefix}.lifecycle", expect=set(acked))
    result = audit(scenario, summary, acked, found)
    assert result.missing == 0, result
    assert result.acknowledged > 0, result


async def test_broker_outage_mid_load(
    broker: EmbeddedBroker, bridge: BridgeProcess, prefix: str
) -> None:
    load = asyncio.create_task(run_simulate(bridge.url, 3000, rate=150))
    await asyncio.sleep(2)  # let steady load establish before the outage
    await wait_until_accepted(bridge, 100)  # and be sure it did (a slow machine starts late)
    with frozen(broker):
        await asyncio.sleep(OUTAGE)
    spooled = await bridge.metric("luma_bridge_spooled_total")
    assert spooled > 0, "nothing was spooled during the outage: the fault did not happen"
    summary, acked = await load
    await check("broker frozen mid-load", broker.bootstrap, prefix, summary, acked)


async def test_broker_unreachable_at_start_up(prefix: str, tmp_path: Path) -> None:
    port = free_port()
    bridge = BridgeProcess(f"127.0.0.1:{port}", spool_dir=tmp_path, prefix=prefix).start()
    try:
        await bridge.wait_ready()  # ready: the spool takes callbacks while Kafka is away
        summary, acked = await run_simulate(bridge.url, 300)
        assert summary["statuses"] == {"200": 300}
        with EmbeddedBroker(port=port) as broker:
            await make_topics(broker.bootstrap, prefix)
            await check("broker unreachable at start-up", broker.bootstrap, prefix, summary, acked)
    finally:
        bridge.stop()


async def test_sigterm_mid_load_exits_0_and_loses_nothing(
    broker: EmbeddedBroker, bridge: BridgeProcess, prefix: str
) -> None:
    load = asyncio.create_task(run_simulate(bridge.url, 2000, rate=400, concurrency=32))
    await asyncio.sleep(2)
    await wait_until_accepted(bridge, 100)  # mid-load, even on a slow machine
    bridge.signal(signal.SIGTERM)
    assert await asyncio.to_thread(bridge.wait, 30) == 0, bridge.log_text()
    summary, acked = await load
    assert summary["final_statuses"].get("connection error", 0) > 0  # it did stop mid-load
    await check("SIGTERM mid-load", broker.bootstrap, prefix, summary, acked)


async def test_sigkill_with_a_full_spool_then_restart_loses_nothing(
    broker: EmbeddedBroker, bridge: BridgeProcess, prefix: str, tmp_path: Path
) -> None:
    with frozen(broker):
        load = asyncio.create_task(run_simulate(bridge.url, 2000, rate=300, concurrency=32))
        # Killed while callbacks are being spooled (each one fsynced before its 200).
        await bridge.wait_for_metric("luma_bridge_spool_records", 200)
        bridge.signal(signal.SIGKILL)
        summary, acked = await load
    assert len(acked) > 0
    restarted = BridgeProcess(broker.bootstrap, spool_dir=tmp_path, prefix=prefix).start()
    try:
        await restarted.wait_ready()
        await check("SIGKILL mid-load, restart", broker.bootstrap, prefix, summary, acked)
    finally:
        restarted.stop()


@pytest.mark.parametrize("bridge", [{"spool_max_bytes": 1024 * 1024}], indirect=True)
async def test_spool_full_answers_503_and_loses_nothing(
    broker: EmbeddedBroker, bridge: BridgeProcess, prefix: str
) -> None:
    with frozen(broker):
        # ~2 KB of records per callback: the 1 MiB spool fills after a few hundred.
        summary, acked = await run_simulate(bridge.url, 1200, concurrency=16)
    assert summary["statuses"].get("503", 0) > 0, summary
    await check("spool full", broker.bootstrap, prefix, summary, acked)


@pytest.mark.parametrize(
    "bridge",
    [{"max_inflight_requests": 4, "spool_enabled": "false", "kafka_ack_timeout": 1}],
    indirect=True,
)
async def test_inflight_bound_sheds_with_503_and_loses_nothing(
    broker: EmbeddedBroker, bridge: BridgeProcess, prefix: str
) -> None:
    with frozen(broker):
        summary, acked = await run_simulate(bridge.url, 64, concurrency=32)
    assert summary["statuses"].get("503", 0) > 0, summary
    after, acked_after = await run_simulate(bridge.url, 200, concurrency=32, seed=8)
    for name in ("sent",):
        summary[name] += after[name]
    for status, count in after["statuses"].items():
        summary["statuses"][status] = summary["statuses"].get(status, 0) + count
    await check("in-flight bound", broker.bootstrap, prefix, summary, acked + acked_after)


async def test_slow_broker_acks_past_the_timeout_are_spooled(prefix: str, tmp_path: Path) -> None:
    proxy_port = free_port()
    try:
        broker = EmbeddedBroker(advertised_port=proxy_port).start()
    except EmbeddedBrokerError as exc:
        unavailable(f"no embedded broker for fault tests: {exc}")
        return
    proxy = await DelayingProxy(broker.port, proxy_port).start()
    bootstrap = f"127.0.0.1:{proxy_port}"
    bridge = BridgeProcess(bootstrap, spool_dir=tmp_path, prefix=prefix, kafka_ack_timeout=1)
    try:
        await make_topics(bootstrap, prefix)
        bridge.start()
        await bridge.wait_ready()
        proxy.delay = 1.5  # every broker answer arrives after the bridge's 1 s ack timeout
        load = asyncio.create_task(run_simulate(bridge.url, 600, rate=100))
        await asyncio.sleep(OUTAGE)
        await bridge.wait_for_metric("luma_bridge_spooled_total", 1)  # the load did meet it
        proxy.delay = 0
        summary, acked = await load
        spooled = await bridge.metric("luma_bridge_spooled_total")
        assert spooled > 0, "no ack came past the timeout: the fault did not happen"
        assert summary["statuses"].get("timeout", 0) == 0, summary  # answered within Luma's 5 s
        await check("slow broker", bootstrap, prefix, summary, acked)
    finally:
        bridge.stop()
        await proxy.stop()
        broker.stop()
