"""The public HTTP edge: authenticate, limit, hand the bytes on, answer.

Every status code the callback endpoint can answer is decided in `_answer`,
from the pipeline's `Outcome`. No request gets a 500: anything unexpected is
logged and answered 503, which Luma retries. Refusals before the pipeline (429,
413, 415, 408) are all the `rejected` outcome, so the metric's label set (which
the dashboard and alerts use) does not grow.

The order: rate limit (429), then authentication (401), then content type (415)
and body (413, 408). When signatures are configured the body is read first
(bounded by the same limits), since the signature covers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from bridge.delivery.pipeline import Outcome, Pipeline, Result
from bridge.edge.access import IPAddress
from bridge.edge.auth import TOKEN_MATCH, Authenticator, masked_path
from bridge.edge.limits import mark_body_received, mark_request_started
from bridge.edge.ratelimit import RateLimiter
from bridge.ops.metrics import Metrics, state_label
from bridge.ops.tracing import TRACING_OFF, Tracing

log = logging.getLogger("bridge.edge.http")

RETRY_AFTER_SECONDS = "1"
JSON = "application/json"
_STATUS = {
    Outcome.ACCEPTED: 200,
    Outcome.DUPLICATE: 200,
    Outcome.INVALID: 400,
    Outcome.UNAUTHORIZED: 401,
    Outcome.UNAVAILABLE: 503,
}


DEFAULT_BODY_TIMEOUT = 10.0


class Rejected(Exception):
    """The request is refused before its body reaches the pipeline (408, 413, 415, 429)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_json_content_type(request: web.Request) -> bool:
    """JSON or `+json` media types; no header at all is taken as JSON (Luma sends JSON)."""
    if "Content-Type" not in request.headers:
        return True
    media = request.content_type
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def error_body(status: str, reason: str) -> dict[str, str]:
    return {"status": status, "error": reason}


class CallbackHandler:
    """Handles `POST {callback_path}[/{token}]`."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        auth: Authenticator,
        metrics: Metrics,
        max_body_bytes: int,
        max_inflight: int,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        rate_limiter: RateLimiter | None = None,
        tracing: Tracing = TRACING_OFF,
    ) -> None:
        self._pipeline = pipeline
        self._tracing = tracing
        self._auth = auth
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._max_inflight = max_inflight
        self._body_timeout = body_timeout
        self._rate_limiter = rate_limiter
        self._inflight = 0

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        source = self._auth.sources.source(request)
        if self._inflight >= self._max_inflight:
            self._metrics.shed.labels(reason="inflight_limit").inc()
            result, status = Result(Outcome.UNAVAILABLE, "too many callbacks in flight"), None
        else:
            self._inflight += 1
            self._metrics.inflight.inc()
            try:
                result, status = await self._handle(request, source)
            except Rejected as exc:
                result, status = Result(Outcome.REJECTED, exc.reason), exc.status
            finally:
                self._inflight -= 1
                self._metrics.inflight.dec()
        response = self._answer(result, status)
        self._observe(request, source, result, response.status, started)
        return response

    async def _handle(
        self, request: web.Request, source: IPAddress | None
    ) -> tuple[Result, int | None]:
        if self._rate_limiter is not None and not self._rate_limiter.allow(source):
            raise Rejected(429, "too many requests from this source")
        body = await self._read_body(request) if self._auth.needs_body else None
        decision = self._auth.authenticate(request, body, source=source)
        if not decision.authorized:
            # One answer whatever was wrong: source, token, signature or a replay.
            return Result(Outcome.UNAUTHORIZED, "missing or wrong credentials"), None
        if not is_json_content_type(request):
            raise Rejected(415, "content type must be application/json")
        if body is None:
            body = await self._read_body(request)
        with self._tracing.request(request.headers, request.remote):
            result = await self._pipeline.handle(body, datetime.now(UTC))
        if result.outcome is Outcome.UNAVAILABLE:
            self._auth.release(decision)  # the sender will retry the same signed request
        return result, None

    async def _read_body(self, request: web.Request) -> bytes:
        too_large = Rejected(413, f"body larger than {self._max_body_bytes} bytes")
        if (request.content_length or 0) > self._max_body_bytes:
            raise too_large
        try:
            async with asyncio.timeout(self._body_timeout):
                # Streams and stops as soon as client_max_size (= max_body_bytes) is passed.
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except TimeoutError:
            raise Rejected(408, "body not received in time") from None
        except ConnectionError:
            # The client went away, or its connection was closed to make room (bridge.edge.limits).
            raise Rejected(400, "connection closed before the body was received") from None
        mark_body_received(request)
        return body

    def _answer(self, result: Result, status: int | None) -> web.Response:
        status = status or _STATUS[result.outcome]
        body: dict[str, Any]
        headers = {}
        if status == 429 and self._rate_limiter is not None:
            headers["Retry-After"] = str(self._rate_limiter.retry_after)
        if status == 200 and result.callback is not None:
            body = {"status": "accepted", "event_id": result.callback.event_id}
            if result.outcome is Outcome.DUPLICATE:
                body["duplicate"] = True
        else:
            body = error_body(result.outcome.value, result.reason)
        if status == 503:
            body["error"] += "; retry later"
            headers["Retry-After"] = RETRY_AFTER_SECONDS
        # orjson and a plain Response: json_response's stdlib encoder shows in profiles.
        return web.Response(
            body=orjson.dumps(body), status=status, headers=headers, content_type=JSON
        )

    def _observe(
        self,
        request: web.Request,
        source: IPAddress | None,
        result: Result,
        status: int,
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        callback = result.callback
        state = state_label(callback.state if callback else None)
        self._metrics.observe_callback(state, result.outcome.value, elapsed)
        if not log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "outcome": result.outcome.value,
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
            "path": masked_path(request),
            "source": str(source) if source is not None else "unknown",
        }
        if callback is not None:
            fields.update(
                event_id=callback.event_id,
                generation_id=callback.generation_id,
                state=callback.state,
            )
        if result.reason:
            fields["reason"] = result.reason
        if result.spooled:
            fields["spooled"] = True
        if result.placements:
            fields["records"] = [f"{p.topic}/{p.partition}@{p.offset}" for p in result.placements]
        log.info("callback", extra={"fields": fields})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_errors(metrics: Metrics) -> Middleware:
    """404, 405 and anything unexpected as small JSON bodies, counted; never a 500."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        mark_request_started(request)  # the head deadline is met (bridge.edge.limits)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            outcome, body = Outcome.REJECTED, error_body("rejected", exc.reason.lower())
            response = web.json_response(body, status=exc.status, headers=_allow(exc))
        except Exception:
            log.exception("unexpected error", extra={"fields": {"path": masked_path(request)}})
            outcome = Outcome.UNAVAILABLE
            response = web.json_response(
                error_body("unavailable", "internal error; retry later"),
                status=503,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        metrics.callbacks.labels(state="none", outcome=outcome.value).inc()
        return response

    return middleware


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def create_app(
    *,
    handler: CallbackHandler,
    metrics: Metrics,
    callback_path: str,
    max_body_bytes: int,
) -> web.Application:
    """The public application: one callback route, with or without a path token."""
    app = web.Application(middlewares=[json_errors(metrics)], client_max_size=max_body_bytes)
    app.router.add_post(callback_path, handler.handle)
    app.router.add_post(f"{callback_path}/{{{TOKEN_MATCH}}}", handler.handle)
    return app
