"""Every label an alert or a dashboard panel reads (helm/luma-kafka-bridge/files/) is set,
with the right value, by the event it stands for.

Each case sends one request through the public app and asserts exactly which counter
series moved: a label hard-coded or swapped moves another series, and a count that is
forgotten moves none. The end-to-end Prometheus test cannot see this, since every
series it scrapes starts at 0. The producer's own labels (`topic`, produce error
`reason`) are in tests/delivery/test_publisher.py, `shed{reason="spool_full"}` in
tests/delivery/test_promises.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from bridge import __version__
from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import load_settings
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN, MemoryPublisher, wait_until

PATH = f"/luma/callback/{TOKEN}"
Series = tuple[str, tuple[tuple[str, str], ...]]
# The series alerts and panels read, as counts (a histogram by its _count).
WATCHED = (
    "luma_bridge_callbacks_total",
    "luma_bridge_callback_duration_seconds_count",
    "luma_bridge_duplicate_deliveries_total",
    "luma_bridge_deadletters_total",
    "luma_bridge_generation_age_seconds_count",
    "luma_bridge_shed_total",
)


class App:
    def __init__(self, client: TestClient[Any, Any], publisher: MemoryPublisher, metrics: Metrics):
        self.client = client
        self.publisher = publisher
        self.metrics = metrics

    def counts(self) -> dict[Series, float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in self.metrics.registry.collect()
            for sample in family.samples
            if sample.name in WATCHED
        }

    async def moved_by(
        self, body: bytes, *, path: str = PATH, content_type: str = "application/json"
    ) -> dict[Series, float]:
        """The watched series one request moved, and by how much."""
        before = self.counts()
        response = await self.client.post(path, data=body, headers={"Content-Type": content_type})
        await response.read()
        after = self.counts()
        return {
            series: value - before.get(series, 0.0)
            for series, value in after.items()
            if value != before.get(series, 0.0)
        }


@pytest.fixture
async def app() -> AsyncIterator[App]:
    settings = load_settings(
        auth_tokens=TOKEN, topic_prefix="t", spool_enabled=False, max_inflight_requests=1
    )
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    client = TestClient(TestServer(callback_app(settings, publisher=publisher, metrics=metrics)))
    await client.start_server()
    try:
        yield App(client, publisher, metrics)
    finally:
        await client.close()


def answered(state: str, outcome: str) -> dict[Series, float]:
    return {
        ("luma_bridge_callbacks_total", (("outcome", outcome), ("state", state))): 1,
        ("luma_bridge_callback_duration_seconds_count", (("outcome", outcome),)): 1,
    }


def aged(state: str, model: str) -> dict[Series, float]:
    return {("luma_bridge_generation_age_seconds_count", (("model", model), ("state", state))): 1}


def one(name: str, **labels: str) -> dict[Series, float]:
    return {(name, tuple(sorted(labels.items()))): 1}


def body(**members: Any) -> bytes:
    return json.dumps({**SEED_COMPLETED_VIDEO, **members}).encode()


async def test_an_accepted_callback_is_labelled_by_its_state_and_model(app: App) -> None:
    assert await app.moved_by(body(state="dreaming", model="ray-2")) == {
        **answered("dreaming", "accepted"),
        **aged("dreaming", "ray-2"),
    }


async def test_the_model_may_come_from_the_request(app: App) -> None:
    moved = await app.moved_by(body(request={"model": "photon-1"}))
    assert moved == {**answered("completed", "accepted"), **aged("completed", "photon-1")}


async def test_unknown_states_and_models_fold_into_other_and_absent_ones_into_none(
    app: App,
) -> None:
    assert await app.moved_by(body(state="paused", model="ray-99")) == {
        **answered("other", "accepted"),
        **aged("other", "other"),
    }
    assert await app.moved_by(body(id="no-model")) == {
        **answered("completed", "accepted"),
        **aged("completed", "none"),
    }


async def test_a_callback_without_created_at_has_no_age(app: App) -> None:
    assert await app.moved_by(body(created_at=None)) == answered("completed", "accepted")


async def test_a_duplicate_is_counted_by_its_state(app: App) -> None:
    await app.moved_by(body(state="failed"))
    assert await app.moved_by(body(state="failed")) == {
        **answered("failed", "duplicate"),
        **one("luma_bridge_duplicate_deliveries_total", state="failed"),
    }


@pytest.mark.parametrize(
    ("invalid", "reason"),
    [(b"{not json", "json"), (b"[1]", "shape"), (b'{"id": 5, "state": "queued"}', "schema")],
)
async def test_a_dead_letter_is_counted_by_its_reason(
    app: App, invalid: bytes, reason: str
) -> None:
    assert await app.moved_by(invalid) == {
        **answered("none", "invalid"),
        **one("luma_bridge_deadletters_total", reason=reason),
    }


async def test_refusals_are_unauthorized_or_rejected(app: App) -> None:
    assert await app.moved_by(body(), path="/luma/callback/wrong") == answered(
        "none", "unauthorized"
    )
    assert await app.moved_by(body(), content_type="text/plain") == answered("none", "rejected")
    not_found = await app.moved_by(body(), path="/elsewhere")
    assert not_found == one("luma_bridge_callbacks_total", state="none", outcome="rejected")


async def test_kafka_unavailable_is_counted_by_the_callbacks_state(app: App) -> None:
    app.publisher.failing = "KafkaTimeoutError"
    assert await app.moved_by(body(state="queued")) == answered("queued", "unavailable")


async def test_beyond_the_inflight_bound_the_shed_reason_is_inflight_limit(app: App) -> None:
    app.publisher.gate = asyncio.Event()
    first = asyncio.create_task(app.moved_by(body(id="first")))
    await wait_until(lambda: app.publisher.calls == 1, what="the first callback in flight")
    moved = await app.moved_by(body(id="second", state="queued"))
    assert moved == {
        **answered("none", "unavailable"),
        **one("luma_bridge_shed_total", reason="inflight_limit"),
    }
    app.publisher.gate.set()
    await first


def test_build_info_carries_the_version() -> None:
    metrics = Metrics(CollectorRegistry())
    assert (
        metrics.registry.get_sample_value("luma_bridge_build_info", {"version": __version__}) == 1
    )
