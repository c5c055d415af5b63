"""Two bridges on one broker, as two replicas behind a load balancer: a generation's
callbacks reach different pods, so no bridge can keep their arrival order; consumers stay
correct with the lifecycle's natural order (`GenerationConsumer`'s stale flag)."""

from __future__ import annotations

import tempfile
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.consume.support import follow, generation, new_group, send, take
from tests.helpers import bridge_settings, running_bridge


def replica(settings: Settings) -> Settings:
    """The same bridge (topics, tokens) with its own ports and spool, as another pod."""
    return settings.model_copy(
        update={"spool_dir": Path(tempfile.mkdtemp(prefix="luma-bridge-replica-"))}
    )


@pytest.mark.integration
async def test_two_replicas_may_interleave_a_generation_and_the_consumer_flags_it(
    kafka_broker: KafkaBroker,
) -> None:
    settings = bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)
    generation_id = f"gen-{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        pod_a = await stack.enter_async_context(running_bridge(settings))
        pod_b = await stack.enter_async_context(running_bridge(replica(settings), create=False))
        # Luma sent queued, then dreaming; the load balancer gave them to different pods,
        # and pod A's answer to queued was lost, so Luma's retry of queued lands last.
        await send(pod_b, generation(generation_id, "dreaming"))
        await send(pod_a, generation(generation_id, "queued"))
        await send(pod_b, generation(generation_id, "completed"))

        async with follow(kafka_broker, settings, group_id=new_group(), lifecycle=True) as events:
            seen = await take(events, 3)
    assert [e.state for e in seen] == ["dreaming", "queued", "completed"]
    assert [e.stale for e in seen] == [False, True, False]
    assert seen[1].furthest_state == "dreaming"  # never taken as going back to queued
