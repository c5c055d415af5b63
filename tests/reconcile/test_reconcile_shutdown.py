"""A reconciler asked to stop while Kafka does not answer still stops in time.

Its stop saves the state to Kafka; with Kafka frozen that cannot happen, and the pod
would be SIGKILLed after the Helm chart's grace period, saying nothing. Bounded by
`SHUTDOWN_TIMEOUT`, it says what was not saved and what happens instead, and exits.
"""

from __future__ import annotations

import time

import aiohttp
import pytest

from bridge.devtools.embedded import EmbeddedBroker
from bridge.devtools.fake_luma import FakeLumaAPI
from tests.faults.harness import frozen
from tests.helpers import SEED_COMPLETED_VIDEO, bridge_settings, callback_url
from tests.reconcile.support import API_KEY, ReconcilerProcess, bridge_on

pytestmark = pytest.mark.integration

SHUTDOWN_TIMEOUT = 5.0
GENERATIONS = 10
TRACKED = "luma_bridge_reconciler_generations_tracked"


async def test_a_stop_while_kafka_is_frozen_ends_within_the_shutdown_timeout(
    own_broker: EmbeddedBroker,
) -> None:
    settings = bridge_settings(own_broker.bootstrap, False, topic_partitions=3)
    async with FakeLumaAPI(api_key=API_KEY) as api:
        async with bridge_on(settings, create=True) as bridge, aiohttp.ClientSession() as http:
            for number in range(GENERATIONS):
                dreaming = {**SEED_COMPLETED_VIDEO, "id": f"gen-{number}", "state": "dreaming"}
                async with http.post(callback_url(bridge), json=dreaming) as answer:
                    assert answer.status == 200
        reconciler = ReconcilerProcess(
            settings,
            api,
            "frozen-kafka",
            LUMA_BRIDGE_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
            LUMA_BRIDGE_RECONCILE_AFTER_SECONDS="3600",  # followed, not looked up
        )
        try:
            await reconciler.wait_ready(timeout=60)
            # Something to save: every generation read from the lifecycle topic, in progress.
            await reconciler.wait_for_metric(TRACKED, GENERATIONS, timeout=60)
            with frozen(own_broker):
                asked = time.monotonic()
                code = await reconciler.terminate()
                took = time.monotonic() - asked
        finally:
            log = reconciler.close()
    assert code == 0, log[-4000:]
    assert took < SHUTDOWN_TIMEOUT + 3, f"stopped after {took:.1f}s"
    assert "the state was not saved within SHUTDOWN_TIMEOUT" in log
    # Its producers and consumer closed or cancelled, not left for asyncio to complain about.
    assert '"logger":"asyncio"' not in log, log[-4000:]
