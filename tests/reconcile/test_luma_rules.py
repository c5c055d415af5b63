"""The reconciler's Luma client at its edges (found by mutation testing): what its errors
say, the settings it refuses, the options handed to the official client, which failures are
retried, and the spacing, pause and backoff rules on a controlled clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

import bridge.reconcile.luma as luma_module
from bridge.devtools.fake_luma import FakeLumaAPI
from bridge.ops.metrics import ReconcilerMetrics
from bridge.reconcile.luma import (
    FIRST_BACKOFF,
    GenerationNotFound,
    KeyRejected,
    LumaAPIError,
    LumaClient,
    retry_after_seconds,
)
from tests.helpers import SEED_COMPLETED_VIDEO
from tests.reconcile.support import API_KEY

GENERATION_ID = SEED_COMPLETED_VIDEO["id"]


def client_for(
    base_url: str = "http://127.0.0.1:9/v1",
    *,
    timeout: float = 5.0,
    rate: float | None = 1000.0,
    max_backoff: float = 0.5,
    attempts: int = 4,
) -> tuple[LumaClient, ReconcilerMetrics]:
    metrics = ReconcilerMetrics(CollectorRegistry())
    client = LumaClient(
        api_key=SecretStr(API_KEY),
        base_url=base_url,
        timeout=timeout,
        rate_limit=rate,
        max_backoff=max_backoff,
        metrics=metrics,
        attempts=attempts,
    )
    return client, metrics


def sample(metrics: ReconcilerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def api() -> AsyncIterator[FakeLumaAPI]:
    async with FakeLumaAPI(api_key=API_KEY) as fake:
        fake.put(SEED_COMPLETED_VIDEO)
        yield fake


def test_errors_say_what_failed_and_the_status_when_there_is_one() -> None:
    assert str(LumaAPIError("timeout")) == "Luma's API request failed: timeout"
    error = LumaAPIError("server_error", 502)
    assert str(error) == "Luma's API request failed: server_error (HTTP 502)"
    assert (error.reason, error.status) == ("server_error", 502)
    assert LumaAPIError("other").status is None
    missing = GenerationNotFound()
    assert (missing.reason, missing.status) == ("not_found", 404)
    assert str(missing) == "Luma's API request failed: not_found (HTTP 404)"


def test_retry_after_is_never_negative_and_empty_is_absent() -> None:
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds("") is None
    assert retry_after_seconds("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0
    assert retry_after_seconds("0") == 0.0


@pytest.mark.parametrize(
    "options",
    [
        {"rate": 0.0},
        {"rate": -1.0},
        {"timeout": 0.0},
        {"max_backoff": 0.0},
    ],
)
def test_settings_that_cannot_work_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"^rate_limit, timeout and max_backoff must be above 0$"):
        client_for(**options)  # type: ignore[arg-type]


def test_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match=r"^attempts must be at least 1$"):
        client_for(attempts=0)


async def test_a_rate_below_one_a_second_is_allowed() -> None:
    client, _ = client_for(rate=0.5)
    await client.close()
    assert client._interval == 2.0


async def test_the_official_client_gets_the_key_url_timeout_and_no_retries_of_its_own() -> None:
    client, _ = client_for("http://127.0.0.1:9/v1", timeout=2.5, rate=None, attempts=1)
    try:
        official = client._client
        assert official.auth_token == API_KEY
        assert str(official.base_url).rstrip("/") == "http://127.0.0.1:9/v1"
        assert official.timeout == 2.5
        assert official.max_retries == 0
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("status", "reason", "error_type"),
    [(400, "other", LumaAPIError), (403, "unauthorized", KeyRejected)],
)
async def test_a_client_error_is_not_retried(
    api: FakeLumaAPI, status: int, reason: str, error_type: type[LumaAPIError]
) -> None:
    api.fail_next(3, status, retry_after=None)
    client, metrics = client_for(api.base_url)
    try:
        with pytest.raises(error_type) as caught:
            await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert (caught.value.reason, caught.value.status) == (reason, status)
    assert api.requests[("get", status)] == 1
    errors = "luma_bridge_reconciler_luma_api_errors_total"
    assert sample(metrics, errors, endpoint="get", reason=reason) == 1


async def test_a_bad_gateway_is_retried_and_list_errors_are_labelled_list(
    api: FakeLumaAPI,
) -> None:
    api.fail_next(1, 502, retry_after=None)
    client, metrics = client_for(api.base_url)
    try:
        await client.list_page(limit=10, offset=0)
    finally:
        await client.close()
    assert api.requests[("list", 502)] == 1
    assert api.requests[("list", 200)] == 1
    errors = "luma_bridge_reconciler_luma_api_errors_total"
    assert sample(metrics, errors, endpoint="list", reason="server_error") == 1
    durations = "luma_bridge_reconciler_luma_api_duration_seconds_count"
    assert sample(metrics, durations, endpoint="list") == 1  # the answer, not the failure


async def test_a_slow_answer_is_a_timeout_and_retried() -> None:
    async with FakeLumaAPI(api_key=API_KEY, delay=1.0) as slow:
        slow.put(SEED_COMPLETED_VIDEO)
        client, metrics = client_for(slow.base_url, timeout=0.2, attempts=2)
        try:
            with pytest.raises(LumaAPIError) as caught:
                await client.get(GENERATION_ID)
        finally:
            await client.close()
    assert caught.value.reason == "timeout"
    errors = "luma_bridge_reconciler_luma_api_errors_total"
    assert sample(metrics, errors, endpoint="get", reason="timeout") == 2
    durations = "luma_bridge_reconciler_luma_api_duration_seconds_count"
    assert sample(metrics, durations, endpoint="get") == 0


class Clock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(
        luma_module,
        "time",
        SimpleNamespace(monotonic=fake.monotonic, perf_counter=time.perf_counter, time=time.time),
    )
    monkeypatch.setattr(asyncio, "sleep", fake.sleep)  # as the client sees it
    return fake


async def test_requests_are_spaced_by_one_over_the_rate(clock: Clock) -> None:
    client, _ = client_for(rate=4.0)
    try:
        for _ in range(3):
            await client._take_slot()
    finally:
        await client.close()
    assert clock.sleeps == [0.25, 0.25]


async def test_without_a_rate_limit_requests_are_not_spaced(clock: Clock) -> None:
    client, _ = client_for(rate=None)
    try:
        for _ in range(3):
            await client._take_slot()
    finally:
        await client.close()
    assert clock.sleeps == []


async def test_a_pause_holds_every_request_and_never_shortens(clock: Clock) -> None:
    client, _ = client_for(rate=None)
    try:
        client._pause(2.0)
        client._pause(0.5)  # a shorter pause later does not cut the first one short
        await client._take_slot()
        await client._take_slot()
    finally:
        await client.close()
    assert clock.sleeps == [2.0]


async def test_backoff_doubles_with_jitter_up_to_the_cap_and_retry_after_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        asked.append((low, high))
        return 1.1

    monkeypatch.setattr(luma_module, "random", SimpleNamespace(uniform=uniform))
    client, _ = client_for(max_backoff=3.0)
    try:
        assert client._backoff(0, None) == pytest.approx(FIRST_BACKOFF * 1.1)
        assert client._backoff(2, None) == pytest.approx(FIRST_BACKOFF * 4 * 1.1)
        assert client._backoff(5, None) == 3.0
        assert client._backoff(0, 2.0) == 2.0
        assert client._backoff(0, 10.0) == 3.0
        assert client._backoff(3, 0.0) == 0.0
    finally:
        await client.close()
    assert asked == [(0.8, 1.2)] * 3


async def test_a_page_is_asked_for_with_its_limit_and_offset(api: FakeLumaAPI) -> None:
    for n in range(3):
        api.put({**SEED_COMPLETED_VIDEO, "id": f"page-{n}"})
    client, _ = client_for(api.base_url)
    try:
        page = orjson.loads(await client.list_page(limit=2, offset=1))
    finally:
        await client.close()
    assert [g["id"] for g in page["generations"]] == ["page-1", "page-0"]
    assert (page["limit"], page["offset"]) == (2, 1)


async def test_retry_after_is_honoured_over_the_exponential_backoff(api: FakeLumaAPI) -> None:
    api.fail_next(1, 429, retry_after=1.5)
    client, _ = client_for(api.base_url, max_backoff=5.0)
    started = time.monotonic()
    try:
        await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert time.monotonic() - started >= 1.4


async def test_the_last_failure_leaves_no_pause_behind(api: FakeLumaAPI) -> None:
    api.fail_next(1, 503, retry_after=3)
    client, metrics = client_for(api.base_url, max_backoff=5.0, attempts=1)
    try:
        with pytest.raises(LumaAPIError) as caught:
            await client.get(GENERATION_ID)
        assert (caught.value.reason, caught.value.status) == ("server_error", 503)
        started = time.monotonic()
        await client.get(GENERATION_ID)
        assert time.monotonic() - started < 1.5
    finally:
        await client.close()
    durations = "luma_bridge_reconciler_luma_api_duration_seconds_sum"
    assert 0 < sample(metrics, durations, endpoint="get") < 1.5


async def test_a_429_that_never_ends_is_reported_with_its_status(api: FakeLumaAPI) -> None:
    api.fail_next(2, 429, retry_after=None)
    client, _ = client_for(api.base_url, attempts=2)
    try:
        with pytest.raises(LumaAPIError) as caught:
            await client.get(GENERATION_ID)
    finally:
        await client.close()
    assert (caught.value.reason, caught.value.status) == ("rate_limited", 429)


async def test_slots_do_not_bank_up_while_idle(clock: Clock) -> None:
    client, _ = client_for(rate=4.0)
    try:
        await client._take_slot()
        clock.now += 10.0  # idle for a while
        for _ in range(3):
            await client._take_slot()
    finally:
        await client.close()
    assert clock.sleeps == [0.25, 0.25]
