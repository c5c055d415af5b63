"""From an authenticated body to acknowledged records: validate, dedupe, route, publish.

The pipeline knows nothing of HTTP. It returns a `Result` whose `outcome` the
HTTP edge maps to a status code, in one place.

With a `CallbackVerifier` (`LUMA_BRIDGE_VERIFY=tag|enforce`), a new callback is
checked against Luma's API before it is written: its records then carry the
header `luma-verified`, and a callback the verifier refuses is answered
`unauthorized` (or `unavailable`, for Luma to retry) and written nowhere.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import Histogram

from bridge.contract.callback import (
    CLOUDEVENTS_ON,
    DEFAULT_CALLBACK_PATH,
    Callback,
    CloudEvents,
    InvalidCallback,
    Topics,
    deadletter_headers,
    parse_callback,
    record_headers,
    redact_raw_token,
)
from bridge.delivery.dedupe import DedupeWindow
from bridge.delivery.lanes import Lanes, Refused, Unavailable
from bridge.delivery.publisher import Placement, Publisher, Record
from bridge.delivery.spool import Spool
from bridge.delivery.verification import VERIFIED_HEADER, Action, CallbackVerifier, Verified
from bridge.ops.metrics import Metrics, model_label, state_label
from bridge.ops.tracing import TRACING_OFF, Tracing

log = logging.getLogger("bridge.delivery.pipeline")


class Outcome(enum.StrEnum):
    """How a callback ended. The values are the `outcome` metric label."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    INVALID = "invalid"
    UNAUTHORIZED = "unauthorized"
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one callback, for the response, the metrics and the log line."""

    outcome: Outcome
    reason: str = ""
    callback: Callback | None = None
    placements: tuple[Placement, ...] = field(default=())
    spooled: bool = False


class Pipeline:
    """Turns a callback body into acknowledged Kafka records."""

    def __init__(
        self,
        *,
        publisher: Publisher,
        topics: Topics,
        metrics: Metrics,
        ack_timeout: float,
        lifecycle: bool,
        dedupe: DedupeWindow,
        spool: Spool | None = None,
        lanes: Lanes | None = None,
        callback_path: str = DEFAULT_CALLBACK_PATH,
        cloudevents: CloudEvents = CLOUDEVENTS_ON,
        tracing: Tracing = TRACING_OFF,
        verifier: CallbackVerifier | None = None,
    ) -> None:
        """`verifier` None: callbacks are written unchecked and carry no `luma-verified`."""
        self._verifier = verifier
        self._lanes = lanes or Lanes(publisher=publisher, spool=spool, metrics=metrics)
        self._callback_path = callback_path
        self._topics = topics
        self._metrics = metrics
        self._ack_timeout = ack_timeout
        self._lifecycle = lifecycle
        self._dedupe = dedupe
        self._cloudevents = cloudevents
        self._tracing = tracing
        self._in_flight: dict[str, asyncio.Future[Result]] = {}
        self._age_children: dict[tuple[str | None, str | None], Histogram] = {}

    async def handle(self, body: bytes, received_at: datetime) -> Result:
        """Validate `body` and write it; never raises for anything the sender did."""
        try:
            with self._tracing.span("validate"):
                callback = parse_callback(body, callback_path=self._callback_path)
        except InvalidCallback as exc:
            return await self._dead_letter(body, exc, received_at)
        if callback.event_id in self._dedupe:
            return self._duplicate(callback)
        first = self._in_flight.get(callback.event_id)
        if first is not None:
            # Luma retried while the first delivery is still being written: share its fate.
            outcome = await asyncio.shield(first)
            if outcome.outcome is Outcome.ACCEPTED:
                return self._duplicate(callback)
            return outcome
        return await self._publish_once(callback, received_at)

    async def dead_letter(
        self, body: bytes, error: InvalidCallback, received_at: datetime
    ) -> Result:
        """Dead-letter a body the edge found invalid before it could be parsed (for
        example one that does not decode as its Content-Encoding says)."""
        return await self._dead_letter(body, error, received_at)

    async def _publish_once(self, callback: Callback, received_at: datetime) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._in_flight[callback.event_id] = future
        result: Result | None = None
        try:
            result = await self._verify_and_publish(callback, received_at)
            return result
        finally:
            del self._in_flight[callback.event_id]
            future.set_result(result or Result(Outcome.UNAVAILABLE, "interrupted", callback))

    async def _verify_and_publish(self, callback: Callback, received_at: datetime) -> Result:
        if self._verifier is None:
            return await self._publish(callback, received_at)
        with self._tracing.span("verify"):
            verdict = await self._verifier.verify(callback)
        if verdict.action is Action.REFUSE:
            return Result(Outcome.UNAUTHORIZED, verdict.reason, callback)
        if verdict.action is Action.RETRY_LATER:
            return Result(Outcome.UNAVAILABLE, verdict.reason, callback)
        return await self._publish(callback, received_at, verdict.verified)

    async def _publish(
        self, callback: Callback, received_at: datetime, verified: Verified | None = None
    ) -> Result:
        records = self.records_for(callback, received_at, verified)
        try:
            with self._tracing.span("kafka produce", records=len(records)):
                written = await self._lanes.write(records, self._ack_timeout)
        except Unavailable as exc:
            if exc.spool_full:
                self._metrics.shed.labels(reason="spool_full").inc()
            return Result(Outcome.UNAVAILABLE, exc.reason, callback)
        except Refused as exc:
            return Result(
                Outcome.REJECTED, f"Kafka refuses this callback for good: {exc.reason}", callback
            )
        self._dedupe.add(callback.event_id)
        self._observe_age(callback, received_at)
        return Result(Outcome.ACCEPTED, "", callback, written.placements, spooled=written.spooled)

    def records_for(
        self, callback: Callback, received_at: datetime, verified: Verified | None = None
    ) -> list[Record]:
        """The per-state record and, when enabled, the lifecycle record."""
        key = callback.generation_id.encode()
        headers = record_headers(callback, received_at, cloudevents=self._cloudevents)
        if verified is not None:
            headers.append((VERIFIED_HEADER, verified.value.encode()))
        headers += self._tracing.record_headers()
        records = [Record(self._topics.for_state(callback.state), key, callback.value, headers)]
        if self._lifecycle:
            records.append(Record(self._topics.lifecycle, key, callback.value, headers))
        return records

    def _duplicate(self, callback: Callback) -> Result:
        self._metrics.duplicate_deliveries.labels(state=state_label(callback.state)).inc()
        return Result(Outcome.DUPLICATE, "", callback)

    def _observe_age(self, callback: Callback, received_at: datetime) -> None:
        if callback.created_at is None:
            return
        age = (received_at - callback.created_at).total_seconds()
        if age < 0:
            return
        # The labelled child is kept: `labels()` on every callback showed in profiles.
        key = (callback.state, callback.model)
        child = self._age_children.get(key)
        if child is None:
            child = self._metrics.generation_age.labels(
                state=state_label(callback.state), model=model_label(callback.model)
            )
            if len(self._age_children) < 4096:  # states and models a sender invents: bounded
                self._age_children[key] = child
        child.observe(age)

    async def _dead_letter(
        self, body: bytes, error: InvalidCallback, received_at: datetime
    ) -> Result:
        # Luma retries a 400 three times; one dead letter per body is enough.
        body_id = "deadletter:" + hashlib.blake2b(body, digest_size=16).hexdigest()
        if body_id in self._dedupe:
            return Result(Outcome.INVALID, error.reason)
        headers = deadletter_headers(error.reason, received_at)
        # The raw body is the evidence, but the write token in it must not reach Kafka.
        evidence = redact_raw_token(body, self._callback_path)
        record = Record(self._topics.deadletter, None, evidence, headers)
        try:
            written = await self._lanes.write([record], self._ack_timeout)
        except (Unavailable, Refused) as exc:
            # The raw body must be kept before we say "invalid": otherwise Luma would not
            # retry and the evidence would be gone.
            return Result(Outcome.UNAVAILABLE, exc.reason)
        self._dedupe.add(body_id)
        self._metrics.deadletters.labels(reason=error.kind).inc()
        return Result(
            Outcome.INVALID, error.reason, None, written.placements, spooled=written.spooled
        )
