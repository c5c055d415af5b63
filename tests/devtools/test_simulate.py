"""`simulate` behaves as Luma does: 3 retries, 100 ms apart, on anything but 200."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.contract.callback import InvalidCallback, parse_callback
from bridge.devtools.simulate import (
    SimulateOptions,
    generation_lifecycle,
    planned_bodies,
    simulate,
)


class FlakyReceiver:
    """Fails the first `failures` attempts of every callback, then answers 200."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[bytes, list[float]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        times = self.attempts.setdefault(body, [])
        times.append(time.monotonic())
        if len(times) <= self.failures:
            return web.json_response({"status": "unavailable"}, status=503)
        return web.json_response({"status": "accepted", "event_id": f"e{len(self.attempts)}"})


@pytest.fixture
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FlakyReceiver, str]]:
    flaky = FlakyReceiver(request.param)
    app = web.Application()
    app.router.add_post("/cb", flaky.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield flaky, str(server.make_url("/cb"))
    finally:
        await server.close()


@pytest.mark.parametrize("receiver", [2], indirect=True)
async def test_retries_until_the_receiver_succeeds(receiver: tuple[FlakyReceiver, str]) -> None:
    flaky, url = receiver
    summary = await simulate(SimulateOptions(url=url, count=3, concurrency=1, seed=1))
    assert (summary.sent, summary.attempts, summary.retries) == (3, 9, 6)
    assert summary.delivered == 3
    assert summary.gave_up == 0
    assert summary.statuses == {"503": 6, "200": 3}
    assert len(summary.acknowledged_event_ids) == 3
    for times in flaky.attempts.values():
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= 0.1 for gap in gaps)


@pytest.mark.parametrize("receiver", [10], indirect=True)
async def test_gives_up_after_three_retries(receiver: tuple[FlakyReceiver, str]) -> None:
    flaky, url = receiver
    summary = await simulate(SimulateOptions(url=url, count=1, concurrency=1, seed=1))
    assert (summary.attempts, summary.retries, summary.gave_up) == (4, 3, 1)
    assert [len(t) for t in flaky.attempts.values()] == [4]


async def test_an_unreachable_receiver_counts_as_a_transport_error() -> None:
    options = SimulateOptions(url="http://127.0.0.1:1/cb", count=1, concurrency=1, retry_delay=0)
    summary = await simulate(options)
    assert summary.statuses == {"connection error": 4}


def test_lifecycles_go_queued_dreaming_then_completed_or_failed() -> None:
    rng = random.Random(3)
    finals = set()
    for _ in range(200):
        states = [c["state"] for c in generation_lifecycle(rng, datetime.now(UTC))]
        assert states[:2] == ["queued", "dreaming"]
        finals.add(states[2])
    assert finals == {"completed", "failed"}


def test_count_is_the_number_of_bodies_and_invalid_ones_are_drawn_per_body() -> None:
    options = SimulateOptions(url="http://unused", count=3000, invalid_ratio=0.3, seed=7)
    groups = list(planned_bodies(options, random.Random(7)))
    bodies = [body for group in groups for body in group]
    assert len(bodies) == 3000
    invalid = [body for body in bodies if not _is_valid(body)]
    assert 0.27 <= len(invalid) / len(bodies) <= 0.33
    lifecycle_groups = [group for group in groups if _is_valid(group[0])]
    assert all(len({json.loads(b)["id"] for b in group}) == 1 for group in lifecycle_groups)


def test_count_cuts_the_last_lifecycle_short_and_counts_redeliveries() -> None:
    options = SimulateOptions(url="http://unused", count=7, duplicate_ratio=1.0, seed=1)
    groups = list(planned_bodies(options, random.Random(1)))
    assert [len(group) for group in groups] == [4, 3]
    first = groups[0]
    # The redelivery follows its first delivery, as Luma retrying a lost answer would.
    assert sum(first[i] == first[i - 1] for i in range(1, 4)) == 1
    assert len(set(first)) == 3


def _is_valid(body: bytes) -> bool:
    try:
        parse_callback(body)
    except InvalidCallback:
        return False
    return True
