"""The consumer helper against a real broker and a real bridge: order, dedupe, staleness, commits.

Every test restarts the consumer (a new `GenerationConsumer` in the same group) to
show that what it promises holds across restarts, not only within one run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.consume.consumer import GenerationConsumer
from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.consume.support import follow, generation, new_group, nothing_more, send, take
from tests.helpers import SEED_COMPLETED_VIDEO, SEED_FAILED_VIDEO, running_bridge

pytestmark = pytest.mark.integration

Consumer = Callable[..., GenerationConsumer]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "downstream_service.py"


@pytest.fixture
def consumer(kafka_broker: KafkaBroker, settings: Settings) -> Consumer:
    return functools.partial(follow, kafka_broker, settings)


async def test_completed_events_arrive_typed_and_in_order(
    bridge: BridgeServer, consumer: Consumer, settings: Settings
) -> None:
    await send(bridge, SEED_COMPLETED_VIDEO)
    await send(bridge, SEED_FAILED_VIDEO)
    async with consumer(group_id=new_group(), states=["completed", "failed"]) as events:
        got = {event.state: event for event in await take(events, 2)}

    completed = got["completed"]
    assert completed.generation_id == SEED_COMPLETED_VIDEO["id"]
    assert completed.asset_url == SEED_COMPLETED_VIDEO["assets"]["video"]
    assert completed.model == "ray-2"
    assert completed.topic == f"{settings.topic_prefix}.completed"
    assert len(completed.event_id) == 32
    assert completed.received_at.tzinfo is not None
    assert completed.generation.request == SEED_COMPLETED_VIDEO["request"]
    assert (completed.stale, completed.duplicate) == (False, False)
    failed = got["failed"]
    assert failed.failure_reason == SEED_FAILED_VIDEO["failure_reason"]
    assert failed.asset_url is None


async def test_lifecycle_keeps_per_generation_order_and_filters_states(
    bridge: BridgeServer, consumer: Consumer, settings: Settings
) -> None:
    ids = [f"gen-{n}" for n in range(4)]
    for state in ("queued", "dreaming", "completed"):
        for generation_id in ids:
            await send(bridge, generation(generation_id, state))

    async with consumer(group_id=new_group(), lifecycle=True) as events:
        everything = await take(events, 12)
    for generation_id in ids:
        states = [e.state for e in everything if e.generation_id == generation_id]
        assert states == ["queued", "dreaming", "completed"]

    async with consumer(group_id=new_group(), lifecycle=True, states=["completed"]) as events:
        only_completed = await take(events, 4)
        assert {e.state for e in only_completed} == {"completed"}
        await nothing_more(events)


async def test_handled_events_are_committed_and_the_unhandled_one_comes_again(
    bridge: BridgeServer, consumer: Consumer, settings: Settings
) -> None:
    for n in range(5):
        await send(bridge, generation(f"gen-{n}", "completed"))
    name = new_group()

    async with consumer(group_id=name, lifecycle=True) as events:
        first_run = await take(events, 3)  # 1 and 2 handled; 3 taken but not handled

    async with consumer(group_id=name, lifecycle=True) as events:
        second_run = await take(events, 3)
        await nothing_more(events)
    handled = {e.generation_id for e in first_run[:2]}
    again = {e.generation_id for e in second_run}
    assert again == {f"gen-{n}" for n in range(5)} - handled
    assert first_run[2].generation_id in again


async def test_a_handler_that_raises_gets_the_event_again_after_restart(
    bridge: BridgeServer, consumer: Consumer, settings: Settings
) -> None:
    await send(bridge, generation("gen-poison", "completed"))
    name = new_group()

    class HandlerFailed(Exception):
        pass

    async def handle_one() -> None:
        async with consumer(group_id=name, states=["completed"]) as e:
            async for event in e:
                raise HandlerFailed(event.generation_id)

    with pytest.raises(HandlerFailed):
        await handle_one()

    async with consumer(group_id=name, states=["completed"]) as e:
        (again,) = await take(e, 1)
        await e.commit()
    assert again.generation_id == "gen-poison"

    async with consumer(group_id=name, states=["completed"]) as e:
        await send(bridge, generation("gen-marker", "completed"))
        (next_one,) = await take(e, 1)
    assert next_one.generation_id == "gen-marker"


async def test_redelivered_records_are_skipped_even_across_restarts(
    consumer: Consumer, settings: Settings
) -> None:
    # Two bridges with empty dedupe windows write the same callback twice: at-least-once.
    name = new_group()
    body = generation("gen-dup", "completed")
    async with running_bridge(settings) as first:
        await send(first, body)
    async with consumer(group_id=name, states=["completed"]) as e:
        (original,) = await take(e, 1)
        await e.commit()

    async with running_bridge(settings, create=False) as second:
        await send(second, body)  # the redelivery, after the consumer restarted
        await send(second, generation("gen-after", "completed"))
    async with consumer(group_id=name, states=["completed"]) as e:
        (following,) = await take(e, 1)
        await nothing_more(e)
    assert original.generation_id == "gen-dup"
    assert following.generation_id == "gen-after"

    async with consumer(group_id=new_group(), states=["completed"], skip_duplicates=False) as e:
        every = await take(e, 3)
    repeats = [x for x in every if x.duplicate]
    assert [x.event_id for x in repeats] == [original.event_id]


async def test_a_late_state_is_reported_stale_even_after_a_restart(
    bridge: BridgeServer, consumer: Consumer, settings: Settings
) -> None:
    name = new_group()
    await send(bridge, generation("gen-late", "dreaming", assets=None))
    await send(bridge, generation("gen-late", "completed"))
    async with consumer(group_id=name, lifecycle=True) as events:
        dreaming, completed = await take(events, 2)
        await events.commit()
    assert (dreaming.stale, completed.stale) == (False, False)

    # A late progress update of an earlier state, seen by a restarted consumer. (A late
    # `dreaming` with the same assets would be the same transition: skipped as a duplicate.)
    late = generation("gen-late", "dreaming", assets={"progress_video": "https://cdn/late.mp4"})
    await send(bridge, late)
    await send(bridge, generation("gen-late", "failed", assets=None, failure_reason="moderation"))
    async with consumer(group_id=name, lifecycle=True) as events:
        stale, terminal = await take(events, 2)
    assert (stale.state, stale.stale, stale.furthest_state) == ("dreaming", True, "completed")
    assert (terminal.state, terminal.stale) == ("failed", False)


async def test_per_state_topics_read_out_of_order_never_move_a_generation_back(
    bridge: BridgeServer, consumer: Consumer, settings: Settings
) -> None:
    await send(bridge, generation("gen-x", "completed"))
    name = new_group()
    async with consumer(group_id=name, states=["completed"]) as e:
        await take(e, 1)
        await e.commit()
    await send(bridge, generation("gen-x", "dreaming", assets=None))
    # A restarted consumer that now also follows `dreaming` reads it after `completed`.
    async with consumer(group_id=name, states=["dreaming", "completed"]) as e:
        (dreaming,) = await take(e, 1)
    assert (dreaming.state, dreaming.stale) == ("dreaming", True)


def test_arguments_are_checked_at_once(consumer: Consumer) -> None:
    with pytest.raises(ValueError, match="unknown states"):
        consumer(group_id="g", states=["done"])
    with pytest.raises(ValueError, match="choose states"):
        consumer(group_id="g")
    with pytest.raises(ValueError, match="window"):
        consumer(group_id="g", lifecycle=True, window=-1)


async def test_the_example_service_handles_completed_and_failed_from_a_bridge(
    bridge: BridgeServer, settings: Settings
) -> None:
    await send(bridge, generation("gen-q", "queued", assets=None))
    await send(bridge, SEED_COMPLETED_VIDEO)
    await send(bridge, SEED_FAILED_VIDEO)
    env = {**os.environ, "LUMA_BRIDGE_TOPIC_PREFIX": settings.topic_prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--bootstrap",
        settings.kafka_bootstrap_servers,
        "--group",
        new_group(),
        "--max-events",
        "2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(30):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = out.decode()
    assert process.returncode == 0, text
    assert (
        f"ready: {SEED_COMPLETED_VIDEO['id']} (ray-2) {SEED_COMPLETED_VIDEO['assets']['video']}"
        in text
    )
    assert f"failed: {SEED_FAILED_VIDEO['id']}: {SEED_FAILED_VIDEO['failure_reason']}" in text
    assert "gen-q" not in text
