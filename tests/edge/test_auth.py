"""Who gets in, through the public app: each accepted token wherever Luma may put it, and
the near misses (a valid token with more after it, a prefix of one) nowhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import load_settings
from tests.edge.support import SEED_BODY
from tests.helpers import MemoryPublisher

TOKENS = ("first-token-0123456789", "second-token-abcdefgh", "third-token-ZYXWVUTS")
BASE = "/luma/callback"


class App:
    def __init__(self, client: TestClient[Any, Any], publisher: MemoryPublisher) -> None:
        self.client = client
        self.publisher = publisher

    async def status(self, where: str, token: str) -> int:
        """POST the seed callback with `token` in the path, the query or a Bearer header."""
        path, params, headers = BASE, {}, {"Content-Type": "application/json"}
        if where == "path":
            path = f"{BASE}/{token}"
        elif where == "query":
            params = {"token": token}
        else:
            headers["Authorization"] = f"Bearer {token}"
        response = await self.client.post(path, data=SEED_BODY, params=params, headers=headers)
        await response.read()
        return response.status


@pytest.fixture
async def app() -> AsyncIterator[App]:
    settings = load_settings(auth_tokens=",".join(TOKENS), topic_prefix="t", spool_enabled=False)
    publisher = MemoryPublisher()
    client = TestClient(
        TestServer(
            callback_app(settings, publisher=publisher, metrics=Metrics(CollectorRegistry()))
        )
    )
    await client.start_server()
    try:
        yield App(client, publisher)
    finally:
        await client.close()


WHERE = ["path", "query", "bearer"]


@pytest.mark.parametrize("where", WHERE)
async def test_each_accepted_token_is_accepted(app: App, where: str) -> None:
    for n, token in enumerate(TOKENS):
        assert await app.status(where, token) == 200, f"token {n} refused in the {where}"
    assert len(app.publisher.records) == 2  # one callback; the retries are duplicates


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize(
    "near_miss",
    [
        pytest.param(TOKENS[0] + "x", id="valid-token-with-a-suffix"),
        pytest.param(TOKENS[1] + TOKENS[2], id="two-valid-tokens-joined"),
        pytest.param(TOKENS[0][:-1], id="prefix-of-a-valid-token"),
        pytest.param(TOKENS[2][1:], id="suffix-of-a-valid-token"),
        pytest.param(TOKENS[0].upper(), id="other-case"),
        pytest.param("x" + TOKENS[1], id="valid-token-after-a-prefix"),
    ],
)
async def test_a_near_miss_is_refused(app: App, where: str, near_miss: str) -> None:
    assert await app.status(where, near_miss) == 401
    assert app.publisher.records == []


async def test_a_bearer_scheme_is_matched_case_insensitively_and_others_are_ignored(
    app: App,
) -> None:
    async def with_authorization(value: str) -> int:
        response = await app.client.post(
            BASE,
            data=SEED_BODY,
            headers={"Content-Type": "application/json", "Authorization": value},
        )
        await response.read()
        return response.status

    assert await with_authorization(f"bearer {TOKENS[0]}") == 200
    assert await with_authorization(f"Basic {TOKENS[0]}") == 401
    assert await with_authorization(f"Bearer{TOKENS[0]}") == 401
    assert await with_authorization("Bearer ") == 401


async def test_no_token_at_all_is_refused(app: App) -> None:
    response = await app.client.post(
        BASE, data=SEED_BODY, headers={"Content-Type": "application/json"}
    )
    assert response.status == 401
    assert app.publisher.records == []
