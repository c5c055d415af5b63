"""`serve --workers 2` through the CLI on the embedded broker: one port, two processes,
metrics that add up, and the spool of a worker that is gone drained by the next start.

The kernel picks a worker per connection, so each callback here comes on a connection
of its own (as Luma's, from many senders, do): the workers' share is then left to the
kernel's hash, not to how a client happens to pool its connections.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker
from bridge.settings import load_settings
from tests.faults.harness import BridgeProcess, frozen, new_prefix
from tests.helpers import SEED_COMPLETED_VIDEO, consume, wait_until

CALLBACKS = 120


async def post_callbacks(url: str, count: int, concurrency: int = 8) -> set[str]:
    """`count` callbacks of new generations, each on a new connection; the event ids of
    those answered 200."""
    accepted: set[str] = set()
    queue = [{**SEED_COMPLETED_VIDEO, "id": str(uuid.uuid4())} for _ in range(count)]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def sender() -> None:
            while queue:
                async with http.post(url, json=queue.pop()) as response:
                    if response.status == 200:
                        accepted.add((await response.json())["event_id"])

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return accepted


async def on_lifecycle(bootstrap: str, prefix: str, expect: set[str]) -> set[str]:
    """The event ids of `expect` found on the lifecycle topic (read until all are, or 60 s)."""
    records = await consume(
        bootstrap,
        f"{prefix}.lifecycle",
        done=lambda found, idle: (
            expect <= {dict(r.headers)["luma-event-id"].decode() for r in found}
        ),
        timeout=60,
    )
    return expect & {dict(r.headers)["luma-event-id"].decode() for r in records}


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
        acked = await post_callbacks(bridge.url, CALLBACKS)
        assert len(acked) == CALLBACKS
        accepted = await per_worker(bridge, "luma_bridge_callbacks_total", outcome="accepted")
        assert set(accepted) == {"0", "1"}
        assert min(accepted.values()) > 0, accepted  # the kernel gave each worker connections
        assert sum(accepted.values()) == CALLBACKS, accepted
        assert await on_lifecycle(own_broker.bootstrap, prefix, acked) == acked
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
            acked = await post_callbacks(two.url, CALLBACKS // 2)
            assert len(acked) == CALLBACKS // 2  # answered from the spools
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
        assert await on_lifecycle(own_broker.bootstrap, prefix, acked) == acked
    finally:
        one.stop()
