"""The delivery promises, seen from Luma's side of the HTTP edge, on an in-memory publisher.

Each test here is the smallest one that fails on a bug a reviewer could plausibly write
(docs/testing.md lists which): order behind a spool backlog, the 503 when the spool is
full, and a dead letter that could not be written.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from bridge.delivery.spool import Spool, SpoolDrainer
from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import load_settings
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN, MemoryPublisher

PATH = f"/luma/callback/{TOKEN}"
GENERATION = "0b8e4c5e-2f7a-4d6b-9a53-6a1d3c2b1f00"


@dataclass
class Bridge:
    client: TestClient[Any, Any]
    publisher: MemoryPublisher
    metrics: Metrics
    spool: Spool | None

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def drain(self) -> None:
        """Send everything spooled to the publisher, oldest first (the only place these tests
        touch the drainer: adapt it here when the delivery path changes)."""
        assert self.spool is not None
        drainer = SpoolDrainer(self.spool, self.publisher)
        while self.spool.records:
            assert await drainer.drain_once()

    async def post(self, body: bytes) -> int:
        response = await self.client.post(
            PATH, data=body, headers={"Content-Type": "application/json"}
        )
        await response.read()
        return response.status


@asynccontextmanager
async def bridge(
    spool_dir: Path | None = None, spool_max_bytes: int = 1 << 20
) -> AsyncIterator[Bridge]:
    """The public app as `serve` builds it, with a real spool in `spool_dir` when given."""
    settings = load_settings(auth_tokens=TOKEN, topic_prefix="t", spool_enabled=False)
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    spool = None
    if spool_dir is not None:
        spool = Spool(spool_dir, max_bytes=spool_max_bytes, metrics=metrics)
        await spool.open()
    app = callback_app(settings, publisher=publisher, metrics=metrics, spool=spool)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Bridge(client, publisher, metrics, spool)
    finally:
        await client.close()
        if spool is not None:
            await spool.close()


def state(name: str) -> bytes:
    return json.dumps({**SEED_COMPLETED_VIDEO, "id": GENERATION, "state": name}).encode()


def lifecycle_states(publisher: MemoryPublisher) -> list[str]:
    return [
        json.loads(record.value)["state"]
        for record in publisher.records
        if record.topic == "t.lifecycle"
    ]


async def test_a_callback_after_a_spooled_one_queues_behind_it(tmp_path: Path) -> None:
    async with bridge(tmp_path) as running:
        assert running.spool is not None
        running.publisher.failing = "KafkaTimeoutError"
        assert await running.post(state("queued")) == 200
        assert running.spool.records == 2, "the first callback was not spooled"
        # Kafka is back, but the spool has not been drained yet: the next state must not
        # overtake the spooled one.
        running.publisher.failing = None
        assert await running.post(state("dreaming")) == 200
        assert lifecycle_states(running.publisher) == []
        assert running.spool.records == 4
        await running.drain()
        assert lifecycle_states(running.publisher) == ["queued", "dreaming"]


async def test_a_full_spool_answers_503_and_counts_the_shed_callback(tmp_path: Path) -> None:
    # Room for one callback's two records, not for a second one.
    async with bridge(tmp_path, spool_max_bytes=len(state("queued")) * 3) as running:
        assert running.spool is not None
        running.publisher.failing = "KafkaTimeoutError"
        assert await running.post(state("queued")) == 200
        assert running.spool.records == 2
        assert await running.post(state("dreaming")) == 503
        assert running.spool.records == 2
        assert running.sample("luma_bridge_shed_total", reason="spool_full") == 1
        assert running.sample("luma_bridge_shed_total", reason="inflight_limit") == 0
        assert (
            running.sample("luma_bridge_callbacks_total", state="dreaming", outcome="unavailable")
            == 1
        )


async def test_a_dead_letter_that_could_not_be_written_is_kept_on_lumas_retry() -> None:
    invalid = b'{"id": "x", "state": 5}'
    async with bridge() as running:
        running.publisher.failing = "KafkaTimeoutError"
        assert await running.post(invalid) == 503, "an unwritten dead letter must be retried"
        assert running.sample("luma_bridge_deadletters_total", reason="schema") == 0
        running.publisher.failing = None
        assert await running.post(invalid) == 400
        assert [(r.topic, r.value) for r in running.publisher.records] == [
            ("t.deadletter", invalid)
        ]
        assert running.sample("luma_bridge_deadletters_total", reason="schema") == 1
        assert await running.post(invalid) == 400
        assert len(running.publisher.records) == 1, "a repeated invalid body is kept once"
