"""Shared by the consumer-side tests: quick consumer groups, sending callbacks, taking events."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from bridge.consume.consumer import GenerationConsumer, GenerationEvent
from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import SEED_COMPLETED_VIDEO, callback_url


def group_options(broker: KafkaBroker) -> dict[str, Any]:
    """aiokafka options that make joining a group take about a second on Tansu.

    Tansu delays a join by the rebalance timeout, and numbers its first generation 0,
    which aiokafka never leaves: the next member waits for the session to time out.
    Real Kafka refuses sessions under 6 s, so it keeps the defaults.
    """
    if broker.kind != "tansu":
        return {}
    return {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200, "rebalance_timeout_ms": 100}


def follow(broker: KafkaBroker, settings: Settings, **options: Any) -> GenerationConsumer:
    """A `GenerationConsumer` on `settings` that joins its group quickly."""
    return GenerationConsumer(settings=settings, consumer_options=group_options(broker), **options)


def new_group() -> str:
    return f"test-group-{uuid.uuid4().hex[:8]}"


def generation(generation_id: str, state: str, **members: Any) -> dict[str, Any]:
    return {**SEED_COMPLETED_VIDEO, "id": generation_id, "state": state, **members}


async def send(server: BridgeServer, body: dict[str, Any] | bytes, status: int = 200) -> None:
    """POST a callback to the bridge and check its answer."""
    async with aiohttp.ClientSession() as http:
        if isinstance(body, bytes):
            request = http.post(
                callback_url(server), data=body, headers={"Content-Type": "application/json"}
            )
        else:
            request = http.post(callback_url(server), json=body)
        async with request as response:
            assert response.status == status, await response.text()


async def take(
    events: GenerationConsumer, count: int, timeout: float = 15.0
) -> list[GenerationEvent]:
    """The next `count` events; the last one is left unhandled (not yet asked past)."""
    taken: list[GenerationEvent] = []
    async with asyncio.timeout(timeout):
        while len(taken) < count:
            taken.append(await anext(events))
    return taken


async def nothing_more(events: GenerationConsumer, within: float = 1.0) -> None:
    """Assert that no further event arrives within `within` seconds."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(within):
            await anext(events)
