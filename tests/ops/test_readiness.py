"""/readyz: a Kafka outage alone never makes the bridge unready while the spool has room;
a spool that makes no progress while Kafka answers does."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from bridge.ops.admin import Readiness, create_admin_app
from bridge.ops.metrics import Metrics


async def readyz(readiness: Readiness, metrics: Metrics) -> tuple[int, str]:
    async with TestClient(TestServer(create_admin_app(metrics, readiness))) as client:
        response = await client.get("/readyz")
        return response.status, (await response.json()).get("reason", "")


async def test_an_outage_alone_keeps_the_bridge_ready_while_the_spool_has_room() -> None:
    metrics = Metrics(CollectorRegistry())
    room, stalled = True, False
    readiness = Readiness(metrics, spool_has_room=lambda: room, spool_stalled=lambda: stalled)
    readiness.update(accepting=True, kafka_reachable=False)
    assert (await readyz(readiness, metrics))[0] == 200
    room = False
    status, reason = await readyz(readiness, metrics)
    assert status == 503
    assert "spool cannot take" in reason


async def test_a_stalled_spool_while_kafka_answers_is_not_ready() -> None:
    metrics = Metrics(CollectorRegistry())
    stalled = True
    readiness = Readiness(metrics, spool_has_room=lambda: True, spool_stalled=lambda: stalled)
    readiness.update(accepting=True, kafka_reachable=True)
    status, reason = await readyz(readiness, metrics)
    assert status == 503
    assert "no progress" in reason
    assert metrics.registry.get_sample_value("luma_bridge_ready") == 0
    stalled = False
    assert (await readyz(readiness, metrics))[0] == 200
