"""The producer's metadata updates, paced: one at most per backoff (the Apache Kafka
scenario with a partition offline is in tests/faults/test_cluster.py)."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.client import AIOKafkaClient

from bridge.delivery.pacing import pace_metadata_updates

BACKOFF = 0.05


class Updates:
    """A client's `_metadata_update`: when each update started and ended, and its answer."""

    def __init__(self, *answers: bool | Exception) -> None:
        self.answers = list(answers)
        self.started: list[float] = []
        self.ended: list[float] = []

    async def __call__(self, cluster_metadata: Any, topics: Any) -> bool:
        loop = asyncio.get_running_loop()
        self.started.append(loop.time())
        await asyncio.sleep(0)
        self.ended.append(loop.time())
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def paced_client(updates: Updates) -> Any:
    client = SimpleNamespace(_metadata_update=updates)
    pace_metadata_updates(client, BACKOFF)
    return client


def resolution() -> float:
    """How early asyncio may run a timer (its clock resolution)."""
    return asyncio.get_running_loop()._clock_resolution  # type: ignore[attr-defined, no-any-return]


def test_the_installed_aiokafka_client_has_the_update_that_is_paced() -> None:
    # A private method: an upgrade that renames it or changes its arguments fails here.
    parameters = list(inspect.signature(AIOKafkaClient._metadata_update).parameters)
    assert parameters == ["self", "cluster_metadata", "topics"]


async def test_the_first_update_starts_at_once_and_its_answer_is_passed_on() -> None:
    updates = Updates(True)
    client = paced_client(updates)
    asked = asyncio.get_running_loop().time()
    assert await client._metadata_update(None, {"topic"}) is True
    assert updates.started[0] - asked < BACKOFF


async def test_the_next_update_waits_the_backoff_after_the_last_one_ended() -> None:
    updates = Updates(False, False, True)
    client = paced_client(updates)
    answers = [await client._metadata_update(None, None) for _ in range(3)]
    assert answers == [False, False, True]
    gaps = [start - end for start, end in zip(updates.started[1:], updates.ended, strict=False)]
    assert all(gap >= BACKOFF - resolution() for gap in gaps), gaps


async def test_an_update_that_raises_counts_as_ended() -> None:
    updates = Updates(OSError("refused"), True)
    client = paced_client(updates)
    with pytest.raises(OSError, match="refused"):
        await client._metadata_update(None, None)
    assert await client._metadata_update(None, None) is True
    assert updates.started[1] - updates.ended[0] >= BACKOFF - resolution()


async def test_an_update_asked_for_after_the_backoff_starts_at_once() -> None:
    updates = Updates(True, True)
    client = paced_client(updates)
    await client._metadata_update(None, None)
    await asyncio.sleep(BACKOFF * 2)
    asked = asyncio.get_running_loop().time()
    await client._metadata_update(None, None)
    assert updates.started[1] - asked < BACKOFF
