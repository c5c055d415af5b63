"""The public HTTP edge: authenticate, limit, hand the bytes on, answer.

Every status code the callback endpoint can answer is decided in `_answer`,
from the pipeline's `Outcome`. No request gets a 500: anything unexpected is
logged and answered 503, which Luma retries. Refusals before the pipeline (429,
413, 415, 408) are all the `rejected` outcome, so the metric's label set (which
the dashboard and alerts use) does not grow.

The order: rate limit (429), then source and token from the request head (401,
before a byte of the body is read), then content type and encoding (415), then
the body (413, 408, and 503 when the global body budget is spent), its
Content-Encoding (a body that does not decode as it says is 400 `invalid`, its
raw bytes dead-lettered), and the signature when one is configured (401). With
`VERIFY=enforce`, the pipeline may answer a callback Luma's API does not confirm
`unauthorized` (401) and one it cannot check in time `unavailable` (503). An
answer given before the whole body was read closes the connection
(`Connection: close`): the rest of that body is not a request.

The listener must not decode Content-Encoding itself (`GuardedSite` turns
aiohttp's `auto_decompress` off): `bridge.edge.encoding` does it here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.typedefs import Middleware

from bridge.contract.callback import DEFAULT_CALLBACK_PATH, InvalidCallback, parse_callback
from bridge.delivery.pipeline import Outcome, Pipeline, Result
from bridge.edge.access import IPAddress
from bridge.edge.auth import TOKEN_MATCH, Authenticator, masked_path
from bridge.edge.encoding import (
    DecodedTooLarge,
    UndecodableBody,
    UnsupportedEncoding,
    codings,
    decode_body,
)
from bridge.edge.limits import BodyBudget, BodyLimit, mark_body_received, mark_request_started
from bridge.edge.ratelimit import RateLimiter
from bridge.ops.logs import log_line
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
    # From the pipeline: Kafka refuses the records for good (too large for the topic).
    Outcome.REJECTED: 413,
    Outcome.UNAVAILABLE: 503,
}


DEFAULT_BODY_TIMEOUT = 10.0
#: The shed metric's reason when the global body budget is spent.
BODY_BUDGET = "body_budget"
#: The dead-letter metric's reason for a body that does not decode as its Content-Encoding says.
ENCODING_REASON = "encoding"
_UNAUTHORIZED = Result(Outcome.UNAUTHORIZED, "missing or wrong credentials")


class Rejected(Exception):
    """The request is refused before its body reaches the pipeline (408, 413, 415, 429)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_json_content_type(request: web.Request) -> bool:
    """JSON or `+json` media types; no header at all is taken as JSON (Luma sends JSON)."""
    header = request.headers.get("Content-Type")
    if header is None or header == JSON:
        return True  # the common cases, without parsing the header's parameters
    media = request.content_type
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def error_body(status: str, reason: str) -> dict[str, str]:
    return {"status": status, "error": reason}


class Shed(Exception):
    """Answered 503 at once, to protect the bridge (counted by `reason` in the shed metric)."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label
        self.reason = reason


class _Reservation:
    """One request's share of the `BodyBudget`, given back when the request is answered."""

    def __init__(self, budget: BodyBudget | None) -> None:
        self._budget = budget
        self.held = 0

    def grow_to(self, size: int) -> None:
        if self._budget is None or size <= self.held:
            return
        if not self._budget.reserve(size - self.held):
            raise Shed(BODY_BUDGET, "too many request bodies in flight")
        self.held = size

    def release(self) -> None:
        if self._budget is not None:
            self._budget.release(self.held)
        self.held = 0


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
        body_budget: BodyBudget | None = None,
        body_limit: BodyLimit | None = None,
        callback_path: str = DEFAULT_CALLBACK_PATH,
        tracing: Tracing = TRACING_OFF,
    ) -> None:
        self._pipeline = pipeline
        self._tracing = tracing
        self._auth = auth
        self._metrics = metrics
        self._limit = body_limit or BodyLimit(max_body_bytes)
        self._max_inflight = max_inflight
        self._body_timeout = body_timeout
        self._rate_limiter = rate_limiter
        self._budget = body_budget
        self._callback_path = callback_path
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
            reservation = _Reservation(self._budget)
            try:
                result, status = await self._handle(request, source, reservation)
            except Rejected as exc:
                result, status = Result(Outcome.REJECTED, exc.reason), exc.status
            except Shed as exc:
                self._metrics.shed.labels(reason=exc.label).inc()
                result, status = Result(Outcome.UNAVAILABLE, exc.reason), None
            finally:
                reservation.release()
                self._inflight -= 1
                self._metrics.inflight.dec()
        response = self._answer(result, status)
        if not request.content.is_eof():
            # Answered before the whole body arrived: what follows on this connection is
            # the rest of that body, not a request. Say so, rather than reset it later.
            response.force_close()
        self._observe(request, source, result, response.status, started)
        return response

    async def _handle(
        self, request: web.Request, source: IPAddress | None, reservation: _Reservation
    ) -> tuple[Result, int | None]:
        if self._rate_limiter is not None and not self._rate_limiter.allow(source):
            raise Rejected(429, "too many requests from this source")
        if not self._auth.allowed_before_body(request, source):
            # Decided from the head alone: a stranger's body is never read or buffered.
            return _UNAUTHORIZED, None
        if not is_json_content_type(request):
            raise Rejected(415, "content type must be application/json")
        encoding = request.headers.get("Content-Encoding")
        try:
            codings(encoding)
        except UnsupportedEncoding as exc:
            raise Rejected(415, str(exc)) from None
        raw = await self._read_body(request, reservation)
        undecodable: UndecodableBody | None = None
        try:
            body = decode_body(raw, encoding, max_bytes=self._limit.bytes)
        except DecodedTooLarge:
            raise Rejected(413, self._limit.because) from None
        except UndecodableBody as exc:
            body, undecodable = raw, exc
        if body is not raw:
            reservation.grow_to(len(raw) + len(body))
        # One answer whatever was wrong: source, token, signature or a reused webhook id.
        decision = self._auth.verify_body(request, body)
        if not decision.authorized:
            return _UNAUTHORIZED, None
        received_at = datetime.now(UTC)
        if undecodable is not None:
            # The sender's error, not ours: 400, and the bytes as received kept as evidence.
            refused = InvalidCallback(undecodable.reason, ENCODING_REASON)
            result = await self._pipeline.dead_letter(raw, refused, received_at)
        elif decision.repeat and (known := self._auth.accepted_event(decision)) is not None:
            result = self._repeated(body, known)
        else:
            with self._tracing.request(request.headers, request.remote):
                result = await self._pipeline.handle(body, received_at)
        if result.outcome in (Outcome.UNAVAILABLE, Outcome.UNAUTHORIZED):
            # The sender will retry the same signed request (refused by verification: Luma's
            # API may only have lagged); it must be checked again, not taken as a duplicate.
            self._auth.release(decision)
        elif result.callback is not None:
            self._auth.accepted(decision, result.callback.event_id)
        return result, None

    def _repeated(self, body: bytes, event_id: str) -> Result:
        """A Standard Webhooks retry of a callback already written: a duplicate, not a replay."""
        callback = parse_callback(body, callback_path=self._callback_path)
        if callback.event_id != event_id:  # pragma: no cover - same body digest, same id
            raise RuntimeError("a repeated webhook id's body gave another event id")
        self._metrics.duplicate_deliveries.labels(state=state_label(callback.state)).inc()
        return Result(Outcome.DUPLICATE, "", callback)

    async def _read_body(self, request: web.Request, reservation: _Reservation) -> bytes:
        """The body as sent (still content-encoded), within the size limit, the time
        limit and the global budget."""
        limit = self._limit.bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise Rejected(413, self._limit.because)
        reservation.grow_to(declared or 0)
        if request.content.is_eof() and declared is not None:
            # The whole body came with the head (most callbacks: one small packet): it is
            # buffered already, so no time limit to arm. Fewer bytes than declared is a
            # malformed body, as below.
            body = await request.content.read()
            if len(body) != declared:
                raise Rejected(400, "malformed request body")
            mark_body_received(request)
            return body
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._body_timeout):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise Rejected(413, self._limit.because)
                    reservation.grow_to(size)
                    chunks.append(chunk)
        except TimeoutError:
            raise Rejected(408, "body not received in time") from None
        except ConnectionError:
            # The client went away, or its connection was closed to make room (bridge.edge.limits).
            raise Rejected(400, "connection closed before the body was received") from None
        except (PayloadEncodingError, web.RequestPayloadError):
            # A broken chunked encoding, or fewer bytes than Content-Length said (aiohttp's
            # server wraps its parser's error in RequestPayloadError).
            raise Rejected(400, "malformed request body") from None
        mark_body_received(request)
        return b"".join(chunks)

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
            "source": address_text(source),
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
        log_line(log, logging.INFO, "callback", fields)


@functools.lru_cache(maxsize=4096)
def address_text(address: IPAddress | None) -> str:
    """An address for the log line. Cached like `parse_address`, which makes the same few
    address objects over and over: `str()` of one took most of the line's fields' time."""
    return str(address) if address is not None else "unknown"


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
            # Whatever went wrong may have left the request half-read: do not reuse it.
            response.force_close()
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
