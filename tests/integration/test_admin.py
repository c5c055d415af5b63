"""The operators' listener of a running bridge: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge import __version__
from bridge.devtools.embedded import EmbeddedBroker
from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.helpers import SEED_COMPLETED_VIDEO, bridge_settings, callback_url, running_bridge

pytestmark = pytest.mark.integration


def admin(server: BridgeServer, path: str) -> str:
    return f"http://127.0.0.1:{server.admin_port}{path}"


async def samples(http: aiohttp.ClientSession, server: BridgeServer) -> dict[str, float]:
    async with http.get(admin(server, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


async def test_metrics_probes_and_the_callback_port_are_separate(
    bridge: BridgeServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(admin(bridge, "/healthz")) as response:
        assert response.status == 200
    async with http.get(admin(bridge, "/readyz")) as response:
        assert (response.status, (await response.json())["status"]) == (200, "ready")
    async with http.get(f"http://127.0.0.1:{bridge.callback_port}/metrics") as response:
        assert response.status == 404  # never on the public port

    async with http.post(callback_url(bridge), json=SEED_COMPLETED_VIDEO) as response:
        assert response.status == 200
    found = await samples(http, bridge)
    prefix = bridge.settings.topic_prefix
    assert found[f"luma_bridge_build_info{{version={__version__}}}"] == 1
    assert found["luma_bridge_ready{}"] == 1
    assert found["luma_bridge_lifecycle_phase{}"] == 1
    assert found["luma_bridge_callbacks_total{outcome=accepted,state=completed}"] == 1
    for topic in (f"{prefix}.completed", f"{prefix}.lifecycle"):
        assert found[f"luma_bridge_kafka_produce_duration_seconds_count{{topic={topic}}}"] == 1
    assert found["luma_bridge_inflight_requests{}"] == 0


async def test_readyz_turns_503_at_once_when_draining(
    http: aiohttp.ClientSession, settings: Settings
) -> None:
    draining = settings.model_copy(update={"drain_delay": 2.0})
    async with running_bridge(draining) as server:
        stopping = asyncio.create_task(server.stop())
        try:
            async with http.get(admin(server, "/readyz")) as response:
                assert response.status == 503
                assert "draining" in (await response.json())["reason"]
            # Still answering callbacks during the drain delay.
            async with http.post(callback_url(server), json=SEED_COMPLETED_VIDEO) as response:
                assert response.status == 200
        finally:
            await stopping


async def test_produce_errors_are_counted_when_kafka_is_frozen(
    own_broker: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    settings = bridge_settings(
        own_broker.bootstrap, False, kafka_ack_timeout=0.5, spool_enabled=False
    )
    async with running_bridge(settings) as server:
        os.kill(own_broker.pid, signal.SIGSTOP)
        try:
            async with http.post(callback_url(server), json=SEED_COMPLETED_VIDEO) as response:
                assert response.status == 503
        finally:
            os.kill(own_broker.pid, signal.SIGCONT)
        found = await samples(http, server)
        assert found["luma_bridge_kafka_produce_errors_total{reason=timeout}"] == 1
        assert found["luma_bridge_callbacks_total{outcome=unavailable,state=completed}"] == 1
