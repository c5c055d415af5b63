"""Verifying callbacks against Luma's API (`LUMA_BRIDGE_VERIFY=tag|enforce`).

Luma signs nothing: whoever learns the callback URL can post a forged `completed`
with an asset URL of their choosing. The receiver can ask Luma's API instead,
with the reconciler's client (`bridge.reconcile.luma`, one attempt per request):
a callback is confirmed when `generations.get` reports its state or a later one,
and, for `completed` and `failed`, the same asset URLs.

- The generation does not exist (404), or the callback's state is ahead of the
  API's: one re-check after `RECHECK_DELAY` (Luma's API may lag behind its own
  callback), then `false`.
- A terminal state other than the API's (`completed` where Luma says `failed`),
  or other asset URLs than the API's for the same terminal state: `false`.
- No usable answer within `VERIFY_TIMEOUT` (slow, unreachable, 5xx, 429, the
  key refused, or the bridge's own limit toward Luma spent): `unknown`.

`tag` writes every callback with the header `luma-verified`; `enforce` refuses
`false` with 401 and answers `unknown` with 503 (Luma retries), unless
`VERIFY_FALLBACK=accept`. A state the bridge does not know cannot be compared: it
is written as `unknown` in both modes.

The cache keeps what the API reported for `CACHE_SECONDS`, so Luma's retries and
a burst of callbacks for one generation cost one lookup; a 404 is never cached
(the re-check must see the API again). The rate limit is a token bucket that
refuses instead of queueing: a queued lookup would only turn into a timeout.
Both are a few lines over an `OrderedDict` and the clock; a library would add a
dependency to save none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from bridge.contract.callback import STATE_RANK, TERMINAL_STATES, Callback
from bridge.delivery.verification import Action, Verdict, Verified
from bridge.ops.metrics import VerificationMetrics, state_label
from bridge.reconcile.luma import GenerationNotFound, KeyRejected, LumaAPIError, LumaClient
from bridge.settings import Settings

log = logging.getLogger("bridge.reconcile.verify")

#: Pause before the one re-check of a callback ahead of the API (or unknown to it).
RECHECK_DELAY = 0.2
CACHE_SECONDS = 10.0
CACHE_SIZE = 10_000


class GenerationLookup(Protocol):
    """`generations.get` as raw JSON bytes (what `LumaClient.get` is)."""

    async def get(self, generation_id: str) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Report:
    """What Luma's API says about a generation now."""

    state: str
    assets: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Finding:
    """A result and its reason (the metric's labels; the reason also goes in the answer)."""

    verified: Verified
    reason: str
    because: str = ""

    @property
    def reachable(self) -> bool:
        """Luma's API answered: the finding is about the callback, not about the API."""
        return self.reason not in _UNREACHABLE


_UNREACHABLE = ("timeout", "throttled", "api_error", "key_refused")


class Unreachable(Exception):
    """No usable answer from Luma's API; `reason` is a `VERIFICATION_REASONS` label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def judge(claimed_state: str, claimed_assets: Mapping[str, Any], report: Report | None) -> Finding:
    """Does the API's `report` (None: 404) confirm a callback claiming this state and assets?"""
    if report is None:
        return Finding(Verified.FALSE, "not_found", "Luma's API does not know this generation")
    reported = report.state
    if claimed_state not in STATE_RANK or reported not in STATE_RANK:
        if claimed_state == reported:
            return Finding(Verified.TRUE, "confirmed")
        return Finding(Verified.UNKNOWN, "unknown_state")
    if claimed_state == reported:
        if claimed_state in TERMINAL_STATES and not _same_assets(claimed_assets, report.assets):
            return Finding(
                Verified.FALSE,
                "assets_differ",
                f"Luma's API reports other assets for this {reported} generation",
            )
        return Finding(Verified.TRUE, "confirmed")
    if STATE_RANK[reported] > STATE_RANK[claimed_state]:
        return Finding(Verified.TRUE, "confirmed")  # an older callback arriving late
    if STATE_RANK[reported] == STATE_RANK[claimed_state]:
        return Finding(
            Verified.FALSE, "state_differs", f"Luma's API reports this generation {reported}"
        )
    return Finding(
        Verified.FALSE,
        "state_ahead",
        f"Luma's API reports this generation {state_label(reported)}, not {claimed_state}",
    )


def _same_assets(claimed: Mapping[str, Any], reported: Mapping[str, Any]) -> bool:
    """Every asset URL the callback names is the API's (the API may list more)."""
    return all(reported.get(name) == url for name, url in claimed.items())


class TokenBucket:
    """`rate` per second with bursts of `burst`; `take()` never waits."""

    def __init__(
        self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class ReportCache:
    """What the API reported per generation, for `ttl` seconds, at most `size` of them."""

    def __init__(
        self, *, ttl: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._reports: OrderedDict[str, tuple[float, Report]] = OrderedDict()

    def get(self, generation_id: str) -> Report | None:
        entry = self._reports.get(generation_id)
        if entry is None:
            return None
        stored, report = entry
        if self._clock() - stored > self._ttl:
            del self._reports[generation_id]
            return None
        return report

    def put(self, generation_id: str, report: Report) -> None:
        self._reports.pop(generation_id, None)
        self._reports[generation_id] = (self._clock(), report)
        while len(self._reports) > self._size:
            self._reports.popitem(last=False)


class LumaVerifier:
    """The `CallbackVerifier` the server gives the pipeline when VERIFY is `tag` or `enforce`."""

    def __init__(
        self,
        *,
        lookup: GenerationLookup,
        enforce: bool,
        timeout: float,
        accept_unknown: bool,
        rate_limit: float,
        metrics: VerificationMetrics,
        recheck_delay: float = RECHECK_DELAY,
        cache: ReportCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0 or recheck_delay < 0:
            raise ValueError("timeout must be above 0 and recheck_delay at least 0")
        self._lookup = lookup
        self._enforce = enforce
        self._timeout = timeout
        self._accept_unknown = accept_unknown
        self._bucket = TokenBucket(rate=rate_limit, burst=max(1.0, rate_limit), clock=clock)
        self._metrics = metrics
        self._recheck_delay = recheck_delay
        self._cache = cache or ReportCache(ttl=CACHE_SECONDS, size=CACHE_SIZE, clock=clock)
        self._key_refused_logged = False

    async def verify(self, callback: Callback) -> Verdict:
        """Within `timeout`, what to do with `callback`; never raises (but for cancellation)."""
        try:
            async with asyncio.timeout(self._timeout):
                finding = await self._find(callback)
        except TimeoutError:
            finding = Finding(Verified.UNKNOWN, "timeout")
        except Unreachable as exc:
            finding = Finding(Verified.UNKNOWN, exc.reason)
        self._metrics.verifications.labels(
            result=finding.verified.value, reason=finding.reason
        ).inc()
        return self._decide(finding)

    def _decide(self, finding: Finding) -> Verdict:
        verified = finding.verified
        if not self._enforce or verified is Verified.TRUE:
            return Verdict(verified, Action.WRITE)
        if verified is Verified.FALSE:
            return Verdict(verified, Action.REFUSE, f"not confirmed: {finding.because}")
        if finding.reachable or self._accept_unknown:
            return Verdict(verified, Action.WRITE)
        return Verdict(
            verified,
            Action.RETRY_LATER,
            f"cannot verify this callback with Luma's API now ({finding.reason})",
        )

    async def _find(self, callback: Callback) -> Finding:
        claimed_assets = _assets_of(callback.value)
        cached = self._cache.get(callback.generation_id)
        if cached is not None:
            finding = judge(callback.state, claimed_assets, cached)
            if finding.verified is Verified.TRUE:
                return Finding(Verified.TRUE, "cached")
        finding = await self._check(callback, claimed_assets)
        if finding.reason in ("not_found", "state_ahead"):
            # Luma's API may lag behind its own callback: look once more before refusing.
            await asyncio.sleep(self._recheck_delay)
            finding = await self._check(callback, claimed_assets)
        return finding

    async def _check(self, callback: Callback, claimed_assets: Mapping[str, Any]) -> Finding:
        report = await self._fetch(callback.generation_id)
        return judge(callback.state, claimed_assets, report)

    async def _fetch(self, generation_id: str) -> Report | None:
        if not self._bucket.take():
            raise Unreachable("throttled")
        try:
            body = await self._lookup.get(generation_id)
        except GenerationNotFound:
            return None
        except KeyRejected:
            self._log_key_refused()
            raise Unreachable("key_refused") from None
        except LumaAPIError:
            raise Unreachable("api_error") from None
        report = _report_of(body)
        if report is None:
            raise Unreachable("api_error")
        self._cache.put(generation_id, report)
        return report

    def _log_key_refused(self) -> None:
        if not self._key_refused_logged:
            self._key_refused_logged = True
            log.error(
                "Luma's API refused the API key: callbacks cannot be verified. Check "
                "LUMA_BRIDGE_LUMA_API_KEY (the Secret it comes from) and restart"
            )


def _assets_of(value: bytes) -> Mapping[str, Any]:
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:  # valid JSON orjson refuses: integers beyond 64 bits
        document = json.loads(value)
    assets = document.get("assets")
    return assets if isinstance(assets, dict) else {}


def _report_of(body: bytes) -> Report | None:
    """The state and assets of a `Generation` as the API returned it; None if it is not one."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("state"), str):
        return None
    assets = document.get("assets")
    return Report(document["state"], assets if isinstance(assets, dict) else {})


class VerificationService:
    """The verifier and the client it owns, built from settings; `close()` when done."""

    def __init__(self, settings: Settings, *, metrics: VerificationMetrics) -> None:
        if settings.verify == "off" or settings.luma_api_key is None:
            raise ValueError("verification needs VERIFY=tag|enforce and LUMA_API_KEY")
        self.client = LumaClient(
            api_key=settings.luma_api_key,
            base_url=settings.luma_base_url,
            timeout=settings.verify_timeout,
            rate_limit=None,  # the verifier's bucket refuses instead of queueing
            max_backoff=settings.verify_timeout,
            metrics=metrics,
            attempts=1,  # the verifier re-checks on its own terms, within VERIFY_TIMEOUT
        )
        self.verifier = LumaVerifier(
            lookup=self.client,
            enforce=settings.verify == "enforce",
            timeout=settings.verify_timeout,
            accept_unknown=settings.verify_fallback == "accept",
            rate_limit=settings.verify_rate_limit,
            metrics=metrics,
        )

    async def close(self) -> None:
        await self.client.close()
