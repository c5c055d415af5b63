"""The delivery promises, seen from Luma's side of the HTTP edge, on an in-memory publisher.

Each test here is the smallest one that fails on a bug a reviewer could plausibly write
(docs/testing.md lists which): order behind a spool backlog, the 503 when the spool is
full, and a dead letter that could not be written.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from bridge.contract.callback import Topics
from bridge.delivery.dedupe import DedupeWindow
from bridge.delivery.lanes import Lanes
from bridge.delivery.pipeline import Pipeline
from bridge.delivery.spool import ROW_OVERHEAD_BYTES, WAL_FACTOR, Spool
from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import load_settings
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN, MemoryPublisher, wait_until

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
        lanes = Lanes(publisher=self.publisher, spool=self.spool, metrics=self.metrics)
        lanes.open()
        for _ in range(100):
            if not self.spool.records:
                return
            await lanes.step()
            await asyncio.sleep(0)
        raise AssertionError(f"{self.spool.records} records still spooled")

    async def answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        response = await self.client.post(
            PATH, data=body, headers={"Content-Type": "application/json"}
        )
        return response.status, await response.json()

    async def post(self, body: bytes) -> int:
        response = await self.client.post(
            PATH, data=body, headers={"Content-Type": "application/json"}
        )
        await response.read()
        return response.status


@asynccontextmanager
async def bridge(
    spool_dir: Path | None = None, spool_max_bytes: int = 1 << 20, *, lifecycle: bool = True
) -> AsyncIterator[Bridge]:
    """The public app as `serve` builds it, with a real spool in `spool_dir` when given."""
    settings = load_settings(
        auth_tokens=TOKEN, topic_prefix="t", spool_enabled=False, lifecycle_topic=lifecycle
    )
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
    # Room on disk for one callback's two records, not for a second one: an empty spool's
    # own bytes, plus each record written twice (WAL, then database) with its row overhead.
    probe = Spool(tmp_path / "probe", max_bytes=2 << 20, metrics=Metrics(CollectorRegistry()))
    await probe.open()
    empty = probe.disk_bytes
    await probe.close()
    one_callback = 2 * WAL_FACTOR * (len(state("queued")) + 200 + ROW_OVERHEAD_BYTES)
    room = empty + one_callback + one_callback // 2
    async with bridge(tmp_path / "spool", spool_max_bytes=room) as running:
        assert running.spool is not None
        running.publisher.failing = "KafkaTimeoutError"
        assert await running.post(state("queued")) == 200
        assert running.spool.records == 2
        assert await running.answer(state("dreaming")) == (
            503,
            {
                "status": "unavailable",
                "error": "Kafka unavailable and the spool is full; retry later",
            },
        )
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
        assert await running.answer(invalid) == (
            503,
            {"status": "unavailable", "error": "Kafka unavailable: KafkaTimeoutError; retry later"},
        ), "an unwritten dead letter must be retried"
        assert running.sample("luma_bridge_deadletters_total", reason="schema") == 0
        running.publisher.failing = None
        first = await running.answer(invalid)
        assert first == (
            400,
            {
                "status": "invalid",
                "error": "not a valid Generation: state: Input should be a valid string",
            },
        )
        assert [(r.topic, r.value) for r in running.publisher.records] == [
            ("t.deadletter", invalid)
        ]
        assert [name for name, _ in running.publisher.records[0].headers] == [
            "luma-error",
            "luma-received-at",
        ]
        assert running.sample("luma_bridge_deadletters_total", reason="schema") == 1
        assert await running.answer(invalid) == first  # the same answer for Luma's retry
        assert len(running.publisher.records) == 1, "a repeated invalid body is kept once"


async def test_each_different_invalid_body_is_dead_lettered() -> None:
    async with bridge() as running:
        for body in (b"{", b"[]", b'{"id": 1}'):
            assert await running.post(body) == 400
        assert [r.value for r in running.publisher.records] == [b"{", b"[]", b'{"id": 1}']


async def test_with_kafka_up_and_nothing_spooled_a_callback_goes_straight_to_kafka(
    tmp_path: Path,
) -> None:
    async with bridge(tmp_path, lifecycle=False) as running:
        assert running.spool is not None
        assert await running.post(state("queued")) == 200
        assert running.spool.records == 0
        assert [r.topic for r in running.publisher.records] == ["t.queued"]


async def test_one_spooled_record_is_enough_to_queue_behind(tmp_path: Path) -> None:
    async with bridge(tmp_path, lifecycle=False) as running:
        assert running.spool is not None
        running.publisher.failing = "KafkaTimeoutError"
        assert await running.post(state("queued")) == 200
        assert running.spool.records == 1
        running.publisher.failing = None
        assert await running.post(state("dreaming")) == 200
        assert running.spool.records == 2
        assert running.publisher.records == []


async def test_a_spool_that_cannot_be_written_answers_503_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with bridge(tmp_path) as running:
        assert running.spool is not None
        await running.spool.close()  # every later write fails
        running.publisher.failing = "KafkaTimeoutError"
        assert await running.answer(state("queued")) == (
            503,
            {
                "status": "unavailable",
                "error": "Kafka unavailable and the spool cannot be written; retry later",
            },
        )
        said = [r.getMessage() for r in caplog.records if r.name == "bridge.delivery.spool"]
        assert said == [
            "the spool cannot be written; answering 503 until it can (check the free space "
            "and health of SPOOL_DIR's volume)"
        ]


async def test_a_dead_letter_kept_in_the_spool_is_answered_400_and_logged_as_spooled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.edge.http")
    async with bridge(tmp_path) as running:
        running.publisher.failing = "KafkaTimeoutError"
        assert await running.post(b"{") == 400
        assert running.spool is not None
        assert running.spool.records == 1
        await running.post(state("queued"))  # accepted, spooled too
        await running.post(state("queued"))  # a duplicate: no reason, nothing spooled
    lines = [
        getattr(r, "fields", {})
        for r in caplog.records
        if r.name == "bridge.edge.http" and r.getMessage() == "callback"
    ]
    assert [(f["outcome"], f.get("spooled"), f.get("reason")) for f in lines] == [
        ("invalid", True, "body is not valid UTF-8 JSON"),
        ("accepted", True, None),
        ("duplicate", None, None),
    ]


async def test_generation_age_is_observed_from_created_at_and_never_negative() -> None:
    metrics = Metrics(CollectorRegistry())
    pipeline = Pipeline(
        publisher=MemoryPublisher(),
        topics=Topics("t"),
        metrics=metrics,
        ack_timeout=1.0,
        lifecycle=False,
        dedupe=DedupeWindow(size=10, ttl=60),
    )
    created = datetime(2026, 5, 30, 12, 34, 56, tzinfo=UTC)  # SEED_COMPLETED_VIDEO's created_at
    for n, received in enumerate(
        (created, created + timedelta(seconds=0.5), created - timedelta(seconds=1))
    ):
        body = json.dumps({**SEED_COMPLETED_VIDEO, "id": f"g{n}"}).encode()
        assert (await pipeline.handle(body, received)).outcome.value == "accepted"
    labels = {"state": "completed", "model": "none"}
    assert (
        metrics.registry.get_sample_value("luma_bridge_generation_age_seconds_count", labels) == 2
    )
    assert (
        metrics.registry.get_sample_value("luma_bridge_generation_age_seconds_sum", labels) == 0.5
    )


async def test_records_are_keyed_by_generation_id() -> None:
    async with bridge() as running:
        assert await running.post(state("queued")) == 200
        assert [(r.topic, r.key) for r in running.publisher.records] == [
            ("t.queued", GENERATION.encode()),
            ("t.lifecycle", GENERATION.encode()),
        ]


async def test_a_redelivery_waiting_on_an_interrupted_first_delivery_is_answered_unavailable() -> (
    None
):
    publisher = MemoryPublisher()
    publisher.gate = asyncio.Event()
    pipeline = Pipeline(
        publisher=publisher,
        topics=Topics("t"),
        metrics=Metrics(CollectorRegistry()),
        ack_timeout=30,
        lifecycle=True,
        dedupe=DedupeWindow(size=10, ttl=60),
    )
    body = state("queued")
    first = asyncio.create_task(pipeline.handle(body, datetime.now(UTC)))
    await wait_until(lambda: publisher.calls == 1, what="the first delivery in flight")
    second = asyncio.create_task(pipeline.handle(body, datetime.now(UTC)))
    await asyncio.sleep(0)  # let the redelivery start waiting on the first
    first.cancel()
    result = await second
    assert (result.outcome.value, result.reason) == ("unavailable", "interrupted")
    assert result.callback is not None
    assert result.callback.generation_id == GENERATION
    assert publisher.calls == 1
