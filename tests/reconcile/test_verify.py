"""The callback verifier's decisions, with a fake lookup in place of Luma's API."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from bridge.contract.callback import Callback, parse_callback
from bridge.delivery.verification import Action, Verified
from bridge.ops.metrics import VerificationMetrics
from bridge.reconcile.luma import GenerationNotFound, KeyRejected, LumaAPIError
from bridge.reconcile.verify import (
    LumaVerifier,
    Report,
    ReportCache,
    TokenBucket,
    judge,
)
from tests.helpers import SEED_COMPLETED_VIDEO

API_KEY = "luma-verify-unit-key-8c1d"
GEN = SEED_COMPLETED_VIDEO["id"]
VIDEO = SEED_COMPLETED_VIDEO["assets"]["video"]


def callback(state: str = "completed", **changes: Any) -> Callback:
    body = {**SEED_COMPLETED_VIDEO, "state": state, **changes}
    return parse_callback(orjson.dumps(body))


def api_body(state: str, **changes: Any) -> bytes:
    return orjson.dumps({**SEED_COMPLETED_VIDEO, "state": state, **changes})


class FakeLookup:
    """Answers each `get` with the next item of `answers` (bytes, an exception, or a
    coroutine function for slow answers); the last one repeats."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def get(self, generation_id: str) -> bytes:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            result: bytes = await answer()
            return result
        assert isinstance(answer, bytes)
        return answer


def verifier(
    lookup: FakeLookup,
    *,
    enforce: bool = True,
    accept_unknown: bool = False,
    timeout: float = 2.0,
    rate_limit: float = 100.0,
    recheck_delay: float = 0.01,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[LumaVerifier, VerificationMetrics]:
    metrics = VerificationMetrics(CollectorRegistry())
    made = LumaVerifier(
        lookup=lookup,
        enforce=enforce,
        timeout=timeout,
        accept_unknown=accept_unknown,
        rate_limit=rate_limit,
        metrics=metrics,
        recheck_delay=recheck_delay,
        clock=clock,
    )
    return made, metrics


def counted(metrics: VerificationMetrics, result: str, reason: str) -> float:
    value = metrics.verifications.labels(result=result, reason=reason)._value.get()
    return float(value)


# The pure judgement: which API reports confirm which callbacks.


@pytest.mark.parametrize(
    ("claimed", "reported", "expected", "reason"),
    [
        ("queued", "queued", Verified.TRUE, "confirmed"),
        ("queued", "dreaming", Verified.TRUE, "confirmed"),  # a late, older callback
        ("dreaming", "completed", Verified.TRUE, "confirmed"),
        ("completed", "completed", Verified.TRUE, "confirmed"),
        ("failed", "failed", Verified.TRUE, "confirmed"),
        ("completed", "dreaming", Verified.FALSE, "state_ahead"),
        ("completed", "queued", Verified.FALSE, "state_ahead"),
        ("dreaming", "queued", Verified.FALSE, "state_ahead"),
        ("completed", "failed", Verified.FALSE, "state_differs"),
        ("failed", "completed", Verified.FALSE, "state_differs"),
        ("paused", "paused", Verified.TRUE, "confirmed"),
        ("paused", "dreaming", Verified.UNKNOWN, "unknown_state"),
        ("completed", "paused", Verified.UNKNOWN, "unknown_state"),
    ],
)
def test_judge_compares_states_by_rank(
    claimed: str, reported: str, expected: Verified, reason: str
) -> None:
    finding = judge(claimed, {"video": VIDEO}, Report(reported, {"video": VIDEO}))
    assert (finding.verified, finding.reason) == (expected, reason)


def test_judge_a_404_is_false() -> None:
    finding = judge("completed", {}, None)
    assert (finding.verified, finding.reason) == (Verified.FALSE, "not_found")


def test_judge_a_terminal_state_needs_the_apis_asset_urls() -> None:
    forged = {"video": "https://attacker.example/video.mp4"}
    assert judge("completed", forged, Report("completed", {"video": VIDEO})).reason == (
        "assets_differ"
    )
    # The API may list more assets than the callback; progress within dreaming may differ.
    more = {"video": VIDEO, "image": "https://cdn.example/thumb.jpg"}
    assert judge("completed", {"video": VIDEO}, Report("completed", more)).verified is Verified.TRUE
    assert judge("dreaming", forged, Report("dreaming", {})).verified is Verified.TRUE


def test_judge_reasons_never_quote_an_unknown_state_or_the_callbacks_assets() -> None:
    finding = judge("completed", {"video": "https://evil/x"}, Report("completed", {"video": "y"}))
    assert "evil" not in finding.because
    finding = judge("completed", {}, Report("dreaming", {}))
    assert finding.because == "Luma's API reports this generation dreaming, not completed"


# The verifier: lookups, re-check, cache, rate limit, time bound, and what each mode does.


async def test_a_confirmed_callback_is_written_as_true() -> None:
    lookup = FakeLookup(api_body("completed"))
    check, metrics = verifier(lookup)
    verdict = await check.verify(callback("completed"))
    assert (verdict.verified, verdict.action) == (Verified.TRUE, Action.WRITE)
    assert lookup.calls == 1
    assert counted(metrics, "true", "confirmed") == 1


async def test_enforce_refuses_a_generation_luma_does_not_know_after_one_recheck() -> None:
    lookup = FakeLookup(GenerationNotFound())
    check, metrics = verifier(lookup)
    verdict = await check.verify(callback("completed"))
    assert (verdict.verified, verdict.action) == (Verified.FALSE, Action.REFUSE)
    assert verdict.reason == "not confirmed: Luma's API does not know this generation"
    assert lookup.calls == 2
    assert counted(metrics, "false", "not_found") == 1


async def test_enforce_refuses_a_completed_that_luma_still_reports_dreaming() -> None:
    lookup = FakeLookup(api_body("dreaming"))
    check, _ = verifier(lookup)
    verdict = await check.verify(callback("completed"))
    assert (verdict.verified, verdict.action) == (Verified.FALSE, Action.REFUSE)
    assert "dreaming" in verdict.reason
    assert lookup.calls == 2


async def test_the_recheck_accepts_when_the_api_caught_up() -> None:
    lagging = FakeLookup(api_body("dreaming"), api_body("completed"))
    check, _ = verifier(lagging)
    assert (await check.verify(callback("completed"))).verified is Verified.TRUE
    new = FakeLookup(GenerationNotFound(), api_body("queued"))
    check, _ = verifier(new)
    assert (await check.verify(callback("queued"))).verified is Verified.TRUE


async def test_a_terminal_mismatch_is_refused_without_a_recheck() -> None:
    lookup = FakeLookup(api_body("failed"))
    check, metrics = verifier(lookup)
    verdict = await check.verify(callback("completed"))
    assert verdict.action is Action.REFUSE
    assert lookup.calls == 1
    assert counted(metrics, "false", "state_differs") == 1


async def test_a_forged_asset_url_on_a_real_completed_generation_is_refused() -> None:
    lookup = FakeLookup(api_body("completed"))
    check, metrics = verifier(lookup)
    forged = callback("completed", assets={"video": "https://attacker.example/v.mp4"})
    verdict = await check.verify(forged)
    assert (verdict.verified, verdict.action) == (Verified.FALSE, Action.REFUSE)
    assert "attacker" not in verdict.reason
    assert counted(metrics, "false", "assets_differ") == 1


async def test_tag_writes_everything_and_only_labels_it() -> None:
    for answer, expected in (
        (api_body("completed"), Verified.TRUE),
        (GenerationNotFound(), Verified.FALSE),
        (LumaAPIError("server_error", 503), Verified.UNKNOWN),
    ):
        check, _ = verifier(FakeLookup(answer), enforce=False)
        verdict = await check.verify(callback("completed"))
        assert (verdict.verified, verdict.action) == (expected, Action.WRITE)


async def test_a_slow_api_is_unknown_within_the_timeout() -> None:
    async def slow() -> bytes:
        await asyncio.sleep(10)
        return api_body("completed")

    check, metrics = verifier(FakeLookup(slow), timeout=0.2)
    started = time.monotonic()
    verdict = await check.verify(callback("completed"))
    assert time.monotonic() - started < 1.0
    assert (verdict.verified, verdict.action) == (Verified.UNKNOWN, Action.RETRY_LATER)
    assert verdict.reason == "cannot verify this callback with Luma's API now (timeout)"
    assert counted(metrics, "unknown", "timeout") == 1


async def test_the_recheck_counts_against_the_same_timeout() -> None:
    # A re-check that cannot fit in the time left.
    check, _ = verifier(FakeLookup(api_body("dreaming")), timeout=0.2, recheck_delay=5.0)
    started = time.monotonic()
    verdict = await check.verify(callback("completed"))
    assert time.monotonic() - started < 1.0
    assert verdict.verified is Verified.UNKNOWN


async def test_fallback_accept_writes_what_cannot_be_checked_as_unknown() -> None:
    check, _ = verifier(FakeLookup(LumaAPIError("connection")), accept_unknown=True)
    verdict = await check.verify(callback("completed"))
    assert (verdict.verified, verdict.action) == (Verified.UNKNOWN, Action.WRITE)
    # ... but a callback Luma's API answers about is still refused.
    check, _ = verifier(FakeLookup(GenerationNotFound()), accept_unknown=True)
    assert (await check.verify(callback("completed"))).action is Action.REFUSE


async def test_an_unknown_state_is_written_as_unknown_even_in_enforce() -> None:
    check, metrics = verifier(FakeLookup(api_body("dreaming")))
    verdict = await check.verify(callback("paused-by-luma"))
    assert (verdict.verified, verdict.action) == (Verified.UNKNOWN, Action.WRITE)
    assert counted(metrics, "unknown", "unknown_state") == 1


async def test_an_answer_that_is_not_a_generation_is_an_api_error() -> None:
    check, metrics = verifier(FakeLookup(b"<html>gateway</html>"))
    verdict = await check.verify(callback("completed"))
    assert verdict.action is Action.RETRY_LATER
    assert counted(metrics, "unknown", "api_error") == 1


async def test_a_refused_key_is_logged_once_without_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check, metrics = verifier(FakeLookup(KeyRejected("unauthorized", 401)))
    with caplog.at_level(logging.ERROR, logger="bridge.reconcile.verify"):
        for _ in range(3):
            verdict = await check.verify(callback("completed"))
            assert verdict.action is Action.RETRY_LATER
    assert len(caplog.records) == 1
    assert "LUMA_BRIDGE_LUMA_API_KEY" in caplog.text
    assert API_KEY not in caplog.text
    assert counted(metrics, "unknown", "key_refused") == 3


async def test_the_cache_answers_a_repeat_without_a_lookup() -> None:
    lookup = FakeLookup(api_body("completed"))
    check, metrics = verifier(lookup)
    await check.verify(callback("completed"))
    await check.verify(callback("dreaming"))  # older than what the API reported: still true
    assert lookup.calls == 1
    assert counted(metrics, "true", "cached") == 1


async def test_a_cached_report_behind_the_callback_is_looked_up_again() -> None:
    lookup = FakeLookup(api_body("dreaming"), api_body("completed"))
    check, _ = verifier(lookup)
    assert (await check.verify(callback("dreaming"))).verified is Verified.TRUE
    assert (await check.verify(callback("completed"))).verified is Verified.TRUE
    assert lookup.calls == 2


async def test_a_404_is_not_cached() -> None:
    lookup = FakeLookup(GenerationNotFound())
    check, _ = verifier(lookup)
    await check.verify(callback("completed"))
    await check.verify(callback("completed"))
    assert lookup.calls == 4  # two lookups, each re-checked


async def test_the_rate_limit_refuses_instead_of_queueing() -> None:
    now = [0.0]
    lookup = FakeLookup(api_body("completed"))
    check, metrics = verifier(lookup, rate_limit=1.0, clock=lambda: now[0])
    assert (await check.verify(callback("completed"))).verified is Verified.TRUE
    other = callback("completed", id="another-generation")
    verdict = await check.verify(other)
    assert (verdict.verified, verdict.action) == (Verified.UNKNOWN, Action.RETRY_LATER)
    assert counted(metrics, "unknown", "throttled") == 1
    assert lookup.calls == 1
    now[0] = 1.0
    assert (await check.verify(other)).verified is Verified.TRUE


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 0.5
    assert [bucket.take(), bucket.take()] == [True, False]


def test_report_cache_expires_and_stays_bounded() -> None:
    now = [0.0]
    cache = ReportCache(ttl=10.0, size=2, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        cache.put(name, Report("queued", {}))
    assert cache.get("a") is None  # the oldest went first
    assert cache.get("c") == Report("queued", {})
    now[0] = 10.5
    assert cache.get("c") is None


def test_verifier_refuses_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="timeout"):
        verifier(FakeLookup(b""), timeout=0)
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1)
