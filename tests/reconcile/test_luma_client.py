"""The reconciler's Luma client: its own retry policy over the official client, and the key kept
out of every message and metric."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr

from bridge.devtools.fake_luma import FakeLumaAPI
from bridge.ops.metrics import ReconcilerMetrics
from bridge.reconcile.luma import (
    GenerationNotFound,
    KeyRejected,
    LumaAPIError,
    LumaClient,
    retry_after_seconds,
)
from tests.helpers import SEED_COMPLETED_VIDEO
from tests.reconcile.support import API_KEY

GENERATION_ID = SEED_COMPLETED_VIDEO["id"]


@pytest.fixture
async def api() -> AsyncIterator[FakeLumaAPI]:
    async with FakeLumaAPI(api_key=API_KEY) as fake:
        fake.put(SEED_COMPLETED_VIDEO)
        yield fake


def make_client(
    api: FakeLumaAPI, *, key: str = API_KEY, rate: float = 1000.0, attempts: int = 4
) -> tuple[LumaClient, ReconcilerMetrics]:
    metrics = ReconcilerMetrics(CollectorRegistry())
    client = LumaClient(
        api_key=SecretStr(key),
        base_url=api.base_url,
        timeout=5.0,
        rate_limit=rate,
        max_backoff=0.5,
        metrics=metrics,
        attempts=attempts,
    )
    return client, metrics


def errors(metrics: ReconcilerMetrics, reason: str, endpoint: str = "get") -> float:
    value = metrics.registry.get_sample_value(
        "luma_bridge_reconciler_luma_api_errors_total", {"endpoint": endpoint, "reason": reason}
    )
    return value or 0.0


async def test_get_returns_the_bytes_luma_sent(api: FakeLumaAPI) -> None:
    client, metrics = make_client(api)
    try:
        body = await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert orjson.loads(body) == SEED_COMPLETED_VIDEO
    count = metrics.registry.get_sample_value(
        "luma_bridge_reconciler_luma_api_duration_seconds_count", {"endpoint": "get"}
    )
    assert count == 1


async def test_429_waits_as_long_as_retry_after_says(api: FakeLumaAPI) -> None:
    api.fail_next(2, 429, retry_after=0.3)
    client, metrics = make_client(api)
    started = time.monotonic()
    try:
        await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert time.monotonic() - started >= 0.55
    assert errors(metrics, "rate_limited") == 2
    assert api.requests[("get", 429)] == 2
    assert api.requests[("get", 200)] == 1


async def test_a_long_retry_after_is_capped(api: FakeLumaAPI) -> None:
    api.fail_next(1, 503, retry_after=3600)
    client, _ = make_client(api)
    started = time.monotonic()
    try:
        await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert time.monotonic() - started < 5


async def test_server_errors_are_retried_then_reported(api: FakeLumaAPI) -> None:
    api.fail_next(10, 500, retry_after=None)
    client, metrics = make_client(api, attempts=3)
    try:
        with pytest.raises(LumaAPIError) as caught:
            await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert caught.value.reason == "server_error"
    assert api.requests[("get", 500)] == 3
    assert errors(metrics, "server_error") == 3


async def test_list_page_is_the_raw_page(api: FakeLumaAPI) -> None:
    client, _ = make_client(api)
    try:
        page = orjson.loads(await client.list_page(limit=10, offset=0))
    finally:
        await client.close()
    assert [g["id"] for g in page["generations"]] == [GENERATION_ID]


async def test_404_is_not_found_and_not_retried(api: FakeLumaAPI) -> None:
    client, metrics = make_client(api)
    try:
        with pytest.raises(GenerationNotFound):
            await client.get("unknown")
    finally:
        await client.close()
    assert api.requests[("get", 404)] == 1
    assert errors(metrics, "not_found") == 1


async def test_a_refused_key_is_reported_without_the_key(api: FakeLumaAPI) -> None:
    key = "not-the-key-0f3b1c2d4e5f"
    client, metrics = make_client(api, key=key)
    try:
        with pytest.raises(KeyRejected) as caught:
            await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert api.requests[("get", 401)] == 1
    assert key not in str(caught.value)
    assert key not in repr(caught.value)
    assert errors(metrics, "unauthorized") == 1
    assert key not in generate_latest(metrics.registry).decode()


async def test_connection_refused_is_a_connection_error() -> None:
    api = FakeLumaAPI(api_key=API_KEY)  # never started: nothing listens on its port
    api.port = 9  # discard: connection refused on loopback
    client, metrics = make_client(api, attempts=2)
    try:
        with pytest.raises(LumaAPIError) as caught:
            await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert caught.value.reason == "connection"
    assert errors(metrics, "connection") == 2


async def test_requests_keep_to_the_rate_limit(api: FakeLumaAPI) -> None:
    client, _ = make_client(api, rate=20.0)
    started = time.monotonic()
    try:
        for _ in range(11):
            await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert time.monotonic() - started >= 0.45  # 10 intervals of 50 ms


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    seconds = retry_after_seconds(in_a_minute)
    assert seconds is not None
    assert 50 < seconds <= 61
