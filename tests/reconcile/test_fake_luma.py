"""The fake of Luma's API, read through the official `lumaai` client, and its lossy sender."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import lumaai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from lumaai.types import Generation, GenerationListResponse

from bridge.devtools.fake_luma import FakeLumaAPI, SenderOptions, choose_drops, send_lifecycles
from tests.helpers import SEED_COMPLETED_VIDEO, wait_until
from tests.reconcile.support import API_KEY


@pytest.fixture
async def api() -> AsyncIterator[FakeLumaAPI]:
    async with FakeLumaAPI(api_key=API_KEY, seed=1) as fake:
        yield fake


def client(api: FakeLumaAPI, key: str = API_KEY) -> lumaai.AsyncLumaAI:
    return lumaai.AsyncLumaAI(auth_token=key, base_url=api.base_url, max_retries=0, timeout=5.0)


def generation(number: int, state: str = "dreaming") -> dict[str, Any]:
    return {**SEED_COMPLETED_VIDEO, "id": f"gen-{number:04d}", "state": state}


async def test_get_returns_what_was_put_in_the_sdk_shape(api: FakeLumaAPI) -> None:
    api.put(SEED_COMPLETED_VIDEO)
    async with client(api) as luma:
        found = await luma.generations.get(SEED_COMPLETED_VIDEO["id"])
        raw = await luma.generations.with_raw_response.get(SEED_COMPLETED_VIDEO["id"])
        body = await raw.read()
    assert isinstance(found, Generation)
    assert found.state == "completed"
    assert found.assets is not None
    assert found.assets.video == SEED_COMPLETED_VIDEO["assets"]["video"]
    assert orjson.loads(body) == SEED_COMPLETED_VIDEO


async def test_a_state_change_is_what_the_next_get_reports(api: FakeLumaAPI) -> None:
    api.put(generation(1, "queued"))
    api.put(generation(1, "completed"))
    async with client(api) as luma:
        assert (await luma.generations.get("gen-0001")).state == "completed"
        listed = await luma.generations.list(limit=10, offset=0)
    assert [g.id for g in listed.generations] == ["gen-0001"]


async def test_list_pages_newest_first_with_has_more(api: FakeLumaAPI) -> None:
    for number in range(25):
        api.put(generation(number))
    async with client(api) as luma:
        first = await luma.generations.list(limit=10, offset=0)
        last = await luma.generations.list(limit=10, offset=20)
    assert isinstance(first, GenerationListResponse)
    assert [g.id for g in first.generations] == [f"gen-{n:04d}" for n in range(24, 14, -1)]
    assert (first.count, first.has_more, first.limit, first.offset) == (10, True, 10, 0)
    assert [g.id for g in last.generations] == [f"gen-{n:04d}" for n in range(4, -1, -1)]
    assert last.has_more is False


async def test_a_silent_api_holds_requests_until_it_answers_again(api: FakeLumaAPI) -> None:
    api.put(generation(3))
    api.stop_answering()
    async with client(api) as luma:
        asked = asyncio.create_task(luma.generations.get("gen-0003"))
        await wait_until(lambda: api.held == 1, timeout=5, what="the request to be held")
        assert not asked.done()
        api.answer_again()
        assert (await asyncio.wait_for(asked, timeout=5)).id == "gen-0003"
    assert api.held == 0


async def test_stopping_a_silent_api_lets_its_held_requests_go() -> None:
    fake = await FakeLumaAPI(api_key=API_KEY).start()
    fake.stop_answering()
    async with client(fake) as luma:
        asked = asyncio.create_task(luma.generations.list(limit=1, offset=0))
        await wait_until(lambda: fake.held == 1, timeout=5, what="the request to be held")
        await asyncio.wait_for(fake.stop(), timeout=5)
        await asyncio.gather(asked, return_exceptions=True)
    assert fake.held == 0


async def test_an_unknown_generation_is_404(api: FakeLumaAPI) -> None:
    async with client(api) as luma:
        with pytest.raises(lumaai.NotFoundError):
            await luma.generations.get("nope")
    api.put(generation(2))
    api.remove("gen-0002")
    async with client(api) as luma:
        with pytest.raises(lumaai.NotFoundError):
            await luma.generations.get("gen-0002")


async def test_a_wrong_key_is_401_and_the_answer_never_repeats_it(api: FakeLumaAPI) -> None:
    wrong = "wrong-key-that-must-not-echo"
    api.put(generation(3))
    async with client(api, key=wrong) as luma:
        with pytest.raises(lumaai.AuthenticationError) as caught:
            await luma.generations.get("gen-0003")
    assert wrong not in str(caught.value)
    assert wrong not in caught.value.response.text
    assert api.requests[("get", 401)] == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, lumaai.RateLimitError),
        (500, lumaai.InternalServerError),
        (503, lumaai.InternalServerError),
    ],
)
async def test_faults_on_demand(api: FakeLumaAPI, status: int, error: type[Exception]) -> None:
    api.put(generation(4))
    api.fail_next(1, status, retry_after=2.0)
    async with client(api) as luma:
        with pytest.raises(error) as caught:
            await luma.generations.get("gen-0004")
        assert (await luma.generations.get("gen-0004")).id == "gen-0004"
    assert isinstance(caught.value, lumaai.APIStatusError)
    assert caught.value.response.headers["retry-after"] == "2"


async def test_a_fault_ratio_answers_that_share_with_the_fault() -> None:
    async with FakeLumaAPI(api_key=API_KEY, fault_ratio=1.0, seed=2) as api:
        api.put(generation(5))
        async with client(api) as luma:
            with pytest.raises(lumaai.InternalServerError):
                await luma.generations.list(limit=5)


async def test_list_refuses_a_bad_limit(api: FakeLumaAPI) -> None:
    async with client(api) as luma:
        with pytest.raises(lumaai.UnprocessableEntityError):
            await luma.generations.list(limit=1000)


def test_drops_are_none_some_or_all() -> None:
    import random

    rng = random.Random(3)
    states = ["queued", "dreaming", "completed"]
    options = SenderOptions(callback_url="http://x", drop_ratio=1.0, drop_all_ratio=0.5)
    outcomes = [choose_drops(rng, options, states) for _ in range(200)]
    assert any(drops == states for drops in outcomes)
    assert any(0 < len(drops) < 3 for drops in outcomes)
    assert all(drops == sorted(drops, key=states.index) for drops in outcomes)
    never = SenderOptions(callback_url="http://x", drop_ratio=0.0)
    assert all(choose_drops(rng, never, states) == [] for _ in range(50))


async def test_the_sender_posts_all_but_the_dropped_and_the_foreign(api: FakeLumaAPI) -> None:
    received: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/luma/callback/tok", receive)
    async with TestServer(app, host="127.0.0.1") as server:
        options = SenderOptions(
            callback_url=str(server.make_url("/luma/callback/tok")),
            count=60,
            drop_ratio=0.3,
            foreign_ratio=0.1,
            step_seconds=0.0,
            rate=1000.0,
            seed=9,
        )
        report = await send_lifecycles(api, options)
    assert report.foreign
    assert report.dropped
    got = {(body["id"], body["state"]) for body in received}
    for generation_id in report.ours:
        truth = api.generations[generation_id]
        assert truth["state"] in ("completed", "failed")
        dropped = set(report.dropped.get(generation_id, []))
        for state in ("queued", "dreaming", truth["state"]):
            assert ((generation_id, state) in got) == (state not in dropped)
        assert truth["request"]["callback_url"] == options.callback_url
    for generation_id in report.foreign:
        assert not any(body["id"] == generation_id for body in received)
        assert api.generations[generation_id]["request"]["callback_url"].startswith("https://else")
    assert report.as_dict()["callbacks_sent"] == len(received)
