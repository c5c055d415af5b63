"""A bridge started before Kafka (in process, so every line it runs is measured): it
answers from the spool, connects in the background once a broker listens, and drains."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry

from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError, free_port
from bridge.server import BridgeServer
from tests.conftest import unavailable
from tests.helpers import SEED_COMPLETED_VIDEO, bridge_settings, callback_url, consume, wait_until


async def test_started_before_kafka_it_spools_then_drains_once_a_broker_listens() -> None:
    port = free_port()
    settings = bridge_settings(f"127.0.0.1:{port}", idempotence=False)
    server = BridgeServer(settings, registry=CollectorRegistry())
    await server.start()
    try:
        assert server.spool is not None
        async with (
            aiohttp.ClientSession() as http,
            http.post(callback_url(server), json=SEED_COMPLETED_VIDEO) as response,
        ):
            assert response.status == 200, await response.text()
        assert server.spool.records == 2  # its state topic and the lifecycle topic
        try:
            broker = EmbeddedBroker(port=port).start()
        except EmbeddedBrokerError as exc:
            unavailable(f"no embedded broker: {exc}")
            return
        try:
            await create_topics(settings)
            await wait_until(
                lambda: server.spool is not None and server.spool.records == 0,
                timeout=60,
                what="the spool drained into the broker that came up",
            )
            records = await consume(
                broker.bootstrap,
                f"{settings.topic_prefix}.lifecycle",
                done=lambda found, idle: bool(found),
                timeout=30,
            )
            assert [r.key for r in records] == [SEED_COMPLETED_VIDEO["id"].encode()]
        finally:
            broker.stop()
    finally:
        await server.stop()
