"""The verifier's edges (found by mutation testing): the service built from settings, the
exact log line of a refused key, and the token bucket and report cache at their bounds."""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from bridge.contract.callback import parse_callback
from bridge.delivery.verification import Action, Verified
from bridge.ops.metrics import VerificationMetrics
from bridge.reconcile.luma import KeyRejected, LumaAPIError
from bridge.reconcile.verify import (
    CACHE_SECONDS,
    CACHE_SIZE,
    LumaVerifier,
    Report,
    ReportCache,
    TokenBucket,
    Unreachable,
    VerificationService,
    judge,
)
from bridge.settings import Settings
from tests.helpers import SEED_COMPLETED_VIDEO
from tests.reconcile.test_verify import FakeLookup, callback, counted


def service_settings(**overrides: Any) -> Settings:
    return Settings.model_validate(
        {
            "verify": "enforce",
            "luma_api_key": "verify-rules-key-77",
            "luma_base_url": "http://127.0.0.1:9/dream-machine/v1",
            "verify_timeout": 0.75,
            "verify_fallback": "accept",
            "verify_rate_limit": 7.0,
            **overrides,
        }
    )


async def test_the_service_builds_its_client_and_verifier_from_the_settings() -> None:
    service = VerificationService(
        service_settings(), metrics=VerificationMetrics(CollectorRegistry())
    )
    try:
        client = service.client
        assert client._client.auth_token == "verify-rules-key-77"
        assert str(client._client.base_url).rstrip("/") == "http://127.0.0.1:9/dream-machine/v1"
        assert client._client.timeout == 0.75
        assert client._interval == 0.0  # no spacing: the verifier's bucket refuses instead
        assert client._max_backoff == 0.75
        assert client._attempts == 1
        verifier = service.verifier
        assert verifier._lookup is client
        assert verifier._enforce is True
        assert verifier._timeout == 0.75
        assert verifier._accept_unknown is True
        assert verifier._bucket._rate == 7.0
        assert verifier._bucket._burst == 7.0
    finally:
        await service.close()


async def test_tag_mode_and_the_rejecting_fallback() -> None:
    settings = service_settings(verify="tag", verify_fallback="reject", verify_rate_limit=0.5)
    service = VerificationService(settings, metrics=VerificationMetrics(CollectorRegistry()))
    try:
        assert service.verifier._enforce is False
        assert service.verifier._accept_unknown is False
        assert service.verifier._bucket._burst == 1.0  # at least one lookup at a time
    finally:
        await service.close()


def test_the_service_needs_verification_on_and_a_key() -> None:
    metrics = VerificationMetrics(CollectorRegistry())
    needs = "verification needs VERIFY=tag\\|enforce and LUMA_API_KEY"
    with pytest.raises(ValueError, match=needs):
        VerificationService(service_settings(verify="off"), metrics=metrics)
    keyless = service_settings().model_copy(update={"luma_api_key": None})
    with pytest.raises(ValueError, match="verification needs"):
        VerificationService(keyless, metrics=metrics)
    assert isinstance(service_settings().luma_api_key, SecretStr)


async def test_a_refused_key_is_logged_as_an_error_saying_what_to_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check = LumaVerifier(
        lookup=FakeLookup(KeyRejected("unauthorized", 401)),
        enforce=True,
        timeout=2.0,
        accept_unknown=False,
        rate_limit=100.0,
        metrics=VerificationMetrics(CollectorRegistry()),
        recheck_delay=0.0,
    )
    with caplog.at_level(logging.ERROR, logger="bridge.reconcile.verify"):
        verdict = await check.verify(callback("completed"))
    assert (verdict.verified, verdict.action) == (Verified.UNKNOWN, Action.RETRY_LATER)
    [line] = caplog.records
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (
        "Luma's API refused the API key: callbacks cannot be verified. Check "
        "LUMA_BRIDGE_LUMA_API_KEY (the Secret it comes from) and restart"
    )


def test_the_token_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=1.0, burst=3.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 100.0  # a long pause refills to the burst, no more
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 100.999
    assert not bucket.take()
    now[0] = 101.0
    assert bucket.take()
    with pytest.raises(ValueError, match="burst at least 1"):
        TokenBucket(rate=1.0, burst=0.5)
    assert TokenBucket(rate=1.0, burst=1.0).take()


def test_the_report_cache_keeps_a_report_for_exactly_its_ttl_and_renews_on_put() -> None:
    now = [0.0]
    cache = ReportCache(ttl=10.0, size=2, clock=lambda: now[0])
    cache.put("a", Report("queued", {}))
    cache.put("b", Report("queued", {}))
    now[0] = 5.0
    cache.put("a", Report("dreaming", {}))  # renewed: now the newest
    cache.put("c", Report("queued", {}))  # evicts b, the oldest
    assert cache.get("b") is None
    assert cache.get("a") == Report("dreaming", {})
    now[0] = 15.0
    assert cache.get("a") == Report("dreaming", {})  # exactly the ttl: still there
    now[0] = 15.001
    assert cache.get("a") is None
    assert cache.get("missing") is None
    assert (CACHE_SECONDS, CACHE_SIZE) == (10.0, 10_000)


def test_unreachable_says_its_reason() -> None:
    assert str(Unreachable("throttled")) == Unreachable("throttled").reason == "throttled"


def test_a_refusal_says_what_the_api_reports() -> None:
    assets = judge("completed", {"video": "https://x/forged.mp4"}, Report("completed", {}))
    assert (assets.verified, assets.reason) == (Verified.FALSE, "assets_differ")
    assert assets.because == "Luma's API reports other assets for this completed generation"
    state = judge("completed", {}, Report("failed", {}))
    assert (state.verified, state.reason) == (Verified.FALSE, "state_differs")
    assert state.because == "Luma's API reports this generation failed"


@pytest.mark.parametrize("body", [b"[1, 2]", b'"completed"', b'{"state": 5}', b"{}"])
async def test_an_answer_that_is_json_but_not_a_generation_is_an_api_error(body: bytes) -> None:
    metrics = VerificationMetrics(CollectorRegistry())
    check = LumaVerifier(
        lookup=FakeLookup(body),
        enforce=True,
        timeout=2.0,
        accept_unknown=False,
        rate_limit=100.0,
        metrics=metrics,
        recheck_delay=0.0,
    )
    verdict = await check.verify(callback("completed"))
    assert (verdict.verified, verdict.action) == (Verified.UNKNOWN, Action.RETRY_LATER)


async def test_assets_that_are_not_an_object_count_as_none() -> None:
    check = LumaVerifier(
        lookup=FakeLookup(orjson.dumps({"id": "g", "state": "completed", "assets": "oops"})),
        enforce=True,
        timeout=2.0,
        accept_unknown=False,
        rate_limit=100.0,
        metrics=VerificationMetrics(CollectorRegistry()),
        recheck_delay=0.0,
    )
    verdict = await check.verify(callback("completed"))
    assert (verdict.verified, verdict.action) == (Verified.FALSE, Action.REFUSE)


SERVICE_NEEDS = "verification needs VERIFY=tag|enforce and LUMA_API_KEY"


def test_nonsense_bounds_are_refused_saying_which() -> None:
    with pytest.raises(ValueError, match=r"^rate must be positive and burst at least 1$"):
        TokenBucket(rate=0.0, burst=1.0)
    with pytest.raises(ValueError, match=r"^timeout must be above 0 and recheck_delay at least 0$"):
        LumaVerifier(
            lookup=FakeLookup(b""),
            enforce=True,
            timeout=0.0,
            accept_unknown=False,
            rate_limit=1.0,
            metrics=VerificationMetrics(CollectorRegistry()),
        )
    with pytest.raises(ValueError, match=re.escape(SERVICE_NEEDS) + "$"):
        VerificationService(
            service_settings(verify="off"), metrics=VerificationMetrics(CollectorRegistry())
        )


async def test_the_service_reports_to_the_metrics_it_is_given() -> None:
    metrics = VerificationMetrics(CollectorRegistry())
    service = VerificationService(service_settings(), metrics=metrics)
    try:
        assert service.client._metrics is metrics
        assert service.verifier._metrics is metrics
    finally:
        await service.close()


class RecordingLookup(FakeLookup):
    def __init__(self, *answers: Any) -> None:
        super().__init__(*answers)
        self.ids: list[str] = []

    async def get(self, generation_id: str) -> bytes:
        self.ids.append(generation_id)
        return await super().get(generation_id)


def made(lookup: FakeLookup, **options: Any) -> tuple[LumaVerifier, VerificationMetrics]:
    metrics = VerificationMetrics(CollectorRegistry())
    values: dict[str, Any] = {
        "enforce": True,
        "timeout": 2.0,
        "accept_unknown": False,
        "rate_limit": 100.0,
        "recheck_delay": 0.0,
        **options,
    }
    return LumaVerifier(lookup=lookup, metrics=metrics, **values), metrics


async def test_the_cache_follows_the_verifiers_clock_and_compares_assets_on_a_hit() -> None:
    now = [0.0]
    body = orjson.dumps({**SEED_COMPLETED_VIDEO})
    lookup = RecordingLookup(body)
    check, metrics = made(lookup, clock=lambda: now[0])
    assert (await check.verify(callback("completed"))).verified is Verified.TRUE
    assert (await check.verify(callback("completed"))).verified is Verified.TRUE  # cached
    assert lookup.ids == [SEED_COMPLETED_VIDEO["id"]]
    assert counted(metrics, "true", "cached") == 1
    now[0] = 10.5  # past the cache's 10 s on the verifier's clock
    await check.verify(callback("completed"))
    assert len(lookup.ids) == 2


async def test_json_that_is_not_a_generation_is_counted_as_an_api_error() -> None:
    check, metrics = made(FakeLookup(b"[1, 2]"))
    await check.verify(callback("completed"))
    assert counted(metrics, "unknown", "api_error") == 1


async def test_an_api_error_is_counted_as_one() -> None:
    check, metrics = made(FakeLookup(LumaAPIError("server_error", 502)))
    await check.verify(callback("completed"))
    assert counted(metrics, "unknown", "api_error") == 1


async def test_a_callback_without_assets_claims_none() -> None:
    body = orjson.dumps({**SEED_COMPLETED_VIDEO, "assets": None})
    check, _ = made(FakeLookup(orjson.dumps(SEED_COMPLETED_VIDEO)))
    verdict = await check.verify(parse_callback(body))
    assert verdict.verified is Verified.TRUE
