"""What Luma's API does not know is dead-lettered once, and replay leaves it alone; a refused key
makes the reconciler unready without the key appearing anywhere."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bridge.consume.deadletter import replay_dead_letters
from bridge.contract.callback import RECONCILE_NOT_FOUND_ERROR, Topics
from bridge.devtools.fake_luma import FakeLumaAPI
from bridge.reconcile.service import ReconcilerService
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import SEED_COMPLETED_VIDEO, bridge_settings, callback_url, wait_until
from tests.reconcile.support import API_KEY, bridge_on, header, read_all

pytestmark = pytest.mark.integration
JSON = {"Content-Type": "application/json"}


def settings_for(broker: KafkaBroker, api: FakeLumaAPI, key: str = API_KEY) -> Settings:
    return bridge_settings(
        broker.bootstrap,
        broker.supports_idempotence,
        topic_partitions=2,
        luma_api_key=key,
        luma_base_url=api.base_url,
        reconcile_after_seconds=0.5,
        reconcile_interval_seconds=0.5,
    )


def generation(generation_id: str, state: str) -> dict[str, Any]:
    assets = SEED_COMPLETED_VIDEO["assets"] if state == "completed" else None
    return {**SEED_COMPLETED_VIDEO, "id": generation_id, "state": state, "assets": assets}


@asynccontextmanager
async def reconciling(settings: Settings, registry: CollectorRegistry) -> AsyncIterator[Any]:
    service = ReconcilerService(settings, registry=registry)
    stopping = asyncio.Event()
    await service.start()
    running = asyncio.create_task(service.reconciler.run(stopping))
    try:
        yield service
    finally:
        stopping.set()
        await running
        await service.stop()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_not_found_is_dead_lettered_once_and_replay_leaves_it(
    kafka_broker: KafkaBroker,
) -> None:
    registry = CollectorRegistry()
    async with FakeLumaAPI(api_key=API_KEY) as api:
        settings = settings_for(kafka_broker, api)
        topics = Topics(settings.topic_prefix)
        api.put(generation("known", "completed"))
        async with bridge_on(settings, create=True) as bridge, aiohttp.ClientSession() as http:
            for body in (generation("unknown", "queued"), generation("known", "dreaming")):
                async with http.post(
                    callback_url(bridge), data=orjson.dumps(body), headers=JSON
                ) as answer:
                    assert answer.status == 200
            async with reconciling(settings, registry):
                await wait_until(
                    lambda: (
                        sample(registry, "luma_bridge_reconciler_deadletters_total") == 1
                        and sample(
                            registry,
                            "luma_bridge_reconciler_records_written_total",
                            state="completed",
                            kind="stale",
                        )
                        == 1
                    ),
                    timeout=60,
                    what="the dead letter and the repair",
                )
                # A few more passes: nothing is written again.
                passes = sample(registry, "luma_bridge_reconciler_passes_total")
                await wait_until(
                    lambda: sample(registry, "luma_bridge_reconciler_passes_total") >= passes + 3,
                    timeout=30,
                    what="three more passes",
                )
                assert sample(registry, "luma_bridge_reconciler_generations_tracked") == 0

    letters = await read_all(settings.kafka_bootstrap_servers, topics.deadletter)
    assert len(letters) == 1
    (letter,) = letters
    assert header(letter, "luma-error") == RECONCILE_NOT_FOUND_ERROR
    assert orjson.loads(letter.value) == {"id": "unknown", "last_state": "queued"}
    assert sample(registry, "luma_bridge_reconciler_lookups_total", outcome="not_found") == 1

    summary = await replay_dead_letters(settings)
    assert (summary.examined, summary.routed, summary.left_alone) == (0, 0, 1)
    assert len(await read_all(settings.kafka_bootstrap_servers, topics.deadletter)) == 1
    lifecycle = await read_all(settings.kafka_bootstrap_servers, topics.lifecycle)
    assert sorted((r.key.decode(), header(r, "luma-state")) for r in lifecycle) == [
        ("known", "completed"),
        ("known", "dreaming"),
        ("unknown", "queued"),
    ]


async def test_a_refused_key_makes_it_unready_and_the_key_appears_nowhere(
    kafka_broker: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    wrong = "luma-wrong-key-7c3a9e1f55d2"
    registry = CollectorRegistry()
    async with FakeLumaAPI(api_key=API_KEY) as api:
        settings = settings_for(kafka_broker, api, key=wrong)
        async with bridge_on(settings, create=True) as bridge, aiohttp.ClientSession() as http:
            body = orjson.dumps(generation("stuck", "dreaming"))
            async with http.post(callback_url(bridge), data=body, headers=JSON) as answer:
                assert answer.status == 200
            async with reconciling(settings, registry) as service:
                await wait_until(
                    lambda: service.reconciler.key_rejected, timeout=60, what="the 401"
                )
                base = f"http://127.0.0.1:{service.admin_port}"
                async with http.get(f"{base}/readyz") as ready:
                    assert ready.status == 503
                    ready_body = await ready.text()
                async with http.get(f"{base}/metrics") as metrics:
                    exposition = await metrics.text()
                async with http.get(f"{base}/healthz") as alive:
                    assert alive.status == 200
    assert "refused the API key" in ready_body
    assert sample(registry, "luma_bridge_reconciler_ready") == 0
    assert "luma_bridge_reconciler_luma_api_errors_total" in exposition
    for text in (ready_body, exposition, caplog.text, generate_latest(registry).decode()):
        assert wrong not in text
        assert API_KEY not in text
    assert "LUMA_BRIDGE_LUMA_API_KEY" in caplog.text  # the log says what to check
