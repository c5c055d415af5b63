"""The reconciler's side of Luma's API: the official `lumaai` client with our own retry policy.

The client's defaults suit an interactive script, not a background worker: it waits
60 s, retries twice by itself and reads `LUMAAI_API_KEY` from the environment. Here
the key, the timeout and `max_retries=0` are passed explicitly, and this module owns
the policy: a request rate limit, and on 429, 5xx, timeouts and connection errors a
backoff that honours `Retry-After` (capped), shared by every request so a 429 pauses
them all. It is a few lines around the one place that knows the response headers,
which a generic retry library would need as much glue to reach.

`with_raw_response` gives the bytes Luma sent, so the records the reconciler writes
carry Luma's own JSON, not a re-serialised SDK model. The API key is only ever handed
to the client: no message, metric label or exception raised here contains it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from email.utils import parsedate_to_datetime
from typing import Any

import lumaai
from pydantic import SecretStr

from bridge.ops.metrics import LumaAPISeries

log = logging.getLogger("bridge.reconcile.luma")

#: Attempts per request before the failure is reported (the first one and 3 retries).
ATTEMPTS = 4
FIRST_BACKOFF = 0.5


class LumaAPIError(Exception):
    """A request to Luma's API failed; `reason` is a closed-set label, never the key or a body."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        message = f"Luma's API request failed: {reason}" + (f" (HTTP {status})" if status else "")
        super().__init__(message)
        self.reason = reason
        self.status = status


class GenerationNotFound(LumaAPIError):
    """Luma's API answered 404: it does not know this generation."""

    def __init__(self) -> None:
        super().__init__("not_found", 404)


class KeyRejected(LumaAPIError):
    """Luma's API refused the key (401 or 403): check LUMA_BRIDGE_LUMA_API_KEY."""


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


class LumaClient:
    """Reads generations from Luma's API, rate-limited, with backoff. `close()` when done.

    `metrics` is the reconciler's or the callback verifier's: their latencies differ in kind.
    """

    def __init__(
        self,
        *,
        api_key: SecretStr,
        base_url: str,
        timeout: float,
        rate_limit: float | None,
        max_backoff: float,
        metrics: LumaAPISeries,
        attempts: int = ATTEMPTS,
    ) -> None:
        if (rate_limit is not None and rate_limit <= 0) or timeout <= 0 or max_backoff <= 0:
            raise ValueError("rate_limit, timeout and max_backoff must be above 0")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._client = lumaai.AsyncLumaAI(
            auth_token=api_key.get_secret_value(),
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
        )
        # None: no spacing here; the caller limits (the verifier refuses rather than waits).
        self._interval = 0.0 if rate_limit is None else 1.0 / rate_limit
        self._max_backoff = max_backoff
        self._attempts = attempts
        self._metrics = metrics
        self._next_slot = time.monotonic()
        self._paused_until = 0.0
        self._slot_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._client.close()

    async def get(self, generation_id: str) -> bytes:
        """The generation as Luma's API returns it, raw JSON bytes.

        Raises `GenerationNotFound` on 404, `KeyRejected` on 401/403, and
        `LumaAPIError` once every attempt failed.
        """
        raw = self._client.generations.with_raw_response

        async def call() -> bytes:
            response = await raw.get(generation_id)
            return await response.read()

        return await self._request("get", call)

    async def list_page(self, *, limit: int, offset: int) -> bytes:
        """One page of `GET /generations` as raw JSON bytes (`{"generations": [...], ...}`)."""
        raw = self._client.generations.with_raw_response

        async def call() -> bytes:
            response = await raw.list(limit=limit, offset=offset)
            return await response.read()

        return await self._request("list", call)

    async def _request(self, endpoint: str, call: Any) -> bytes:
        failure = LumaAPIError("other")
        for attempt in range(self._attempts):
            await self._take_slot()
            started = time.perf_counter()
            try:
                body: bytes = await call()
            except lumaai.APIStatusError as exc:
                failure = self._classify_status(endpoint, exc)
                delay = retry_after_seconds(exc.response.headers.get("retry-after"))
            except lumaai.APITimeoutError:
                failure = self._count(endpoint, LumaAPIError("timeout"))
                delay = None
            except lumaai.APIConnectionError:
                failure = self._count(endpoint, LumaAPIError("connection"))
                delay = None
            else:
                self._metrics.luma_api_duration.labels(endpoint=endpoint).observe(
                    time.perf_counter() - started
                )
                return body
            if not _retriable(failure) or attempt + 1 == self._attempts:
                raise failure
            self._pause(self._backoff(attempt, delay))
        raise failure  # pragma: no cover - the loop always returns or raises

    def _classify_status(self, endpoint: str, exc: lumaai.APIStatusError) -> LumaAPIError:
        status = exc.status_code
        if status == 404:
            return self._count(endpoint, GenerationNotFound())
        if status in (401, 403):
            return self._count(endpoint, KeyRejected("unauthorized", status))
        if status == 429:
            return self._count(endpoint, LumaAPIError("rate_limited", status))
        if status >= 500:
            return self._count(endpoint, LumaAPIError("server_error", status))
        return self._count(endpoint, LumaAPIError("other", status))

    def _count(self, endpoint: str, error: LumaAPIError) -> LumaAPIError:
        self._metrics.luma_api_errors.labels(endpoint=endpoint, reason=error.reason).inc()
        return error

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._max_backoff)
        exponential = FIRST_BACKOFF * 2**attempt
        jitter = random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography
        return float(min(self._max_backoff, exponential * jitter))

    def _pause(self, seconds: float) -> None:
        """Hold every request back for `seconds`: a 429 is about the key, not one request."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def _take_slot(self) -> None:
        async with self._slot_lock:
            now = time.monotonic()
            start = max(now, self._next_slot, self._paused_until)
            self._next_slot = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


def _retriable(error: LumaAPIError) -> bool:
    return error.reason in ("rate_limited", "server_error", "timeout", "connection")
