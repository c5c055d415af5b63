"""Standard Webhooks signatures, for senders or gateways that sign (Luma itself does not).

A signed request carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature` (space-separated `v1,<base64 HMAC-SHA256>` entries) over
`{id}.{timestamp}.{body}`. A request is genuine when one of its signatures matches
one of the configured secrets (several, for rotation) and its timestamp is within
the tolerance of now. Its id is the sender's idempotency key: a retry with the same
id and body is answered as a duplicate, another body under a used id is refused.

Every presented signature is compared with every expected one without an early
exit, so the time taken does not tell which part was wrong. The stdlib `hmac`
module is used rather than a webhook library: what we need is twenty lines, and
the library would not do the replay check or the no-early-exit comparison.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SIGNATURE_VERSION = "v1"
MAX_ID_LENGTH = 256
MAX_SIGNATURES = 8
REMEMBERED_IDS = 100_000
# Compared against when a request carries no usable signature, so that path takes as long.
_PLACEHOLDER = b"\0" * 32


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a request's signature holds, and the id to claim (only when it does)."""

    valid: bool
    webhook_id: str | None = None


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value a sender holding `key` puts on `body`."""
    digest = _digest(key, webhook_id, timestamp, body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def _digest(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> bytes:
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def _presented(header: str) -> list[bytes]:
    """The v1 signatures in a `webhook-signature` header, decoded; others are skipped."""
    signatures = []
    for entry in header.split(" ")[:MAX_SIGNATURES]:
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            signatures.append(base64.b64decode(encoded, validate=True))
        except ValueError:
            continue
    return signatures


class Claim(enum.Enum):
    """What a webhook id's arrival is, next to the ids already seen."""

    NEW = "new"  # first time within the window
    REPEAT = "repeat"  # seen, with the same body: the sender's retry (Standard Webhooks)
    CONFLICT = "conflict"  # seen, with another body: refused


@dataclass(slots=True)
class _Seen:
    expiry: float
    body_digest: bytes
    event_id: str | None = None  # set once the callback was accepted


def body_digest(body: bytes) -> bytes:
    """What a webhook id is remembered with: enough to tell a retry from another body."""
    return hashlib.blake2b(body, digest_size=16).digest()


class ReplayGuard:
    """Webhook ids already used, each with its body's digest, for as long as its
    timestamp is acceptable.

    Standard Webhooks makes `webhook-id` the sender's idempotency key: a retry after
    a lost answer carries the same id and the same body, and must not be refused.
    So a repeat with the same body is a `REPEAT` (answered as a duplicate), and only
    another body under a used id is a `CONFLICT`.

    Bounded by time (`ttl`) and by memory (`size` ids, about 300 bytes each): when
    more ids arrive within the window than it can hold, the oldest are forgotten
    before their time, and `on_early_eviction` is called for each, so the shrinking
    window shows in a metric instead of going unseen.
    """

    def __init__(
        self,
        *,
        ttl: float,
        size: int = REMEMBERED_IDS,
        clock: Callable[[], float] = time.monotonic,
        on_early_eviction: Callable[[], None] | None = None,
    ) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._on_early_eviction = on_early_eviction
        self._seen: OrderedDict[str, _Seen] = OrderedDict()  # insertion order = expiry order

    def __len__(self) -> int:
        return len(self._seen)

    def claim(self, webhook_id: str, digest: bytes) -> Claim:
        """Record `webhook_id` with its body's `digest`, or say how it was seen before."""
        now = self._clock()
        self._expire(now)
        seen = self._seen.get(webhook_id)
        if seen is not None:
            return Claim.REPEAT if seen.body_digest == digest else Claim.CONFLICT
        self._seen[webhook_id] = _Seen(now + self._ttl, digest)
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)
            if self._on_early_eviction is not None:
                self._on_early_eviction()  # younger than ttl, or _expire had dropped it
        return Claim.NEW

    def accepted_event(self, webhook_id: str) -> str | None:
        """The event id a seen webhook id's callback was accepted as, if it was."""
        seen = self._seen.get(webhook_id)
        return seen.event_id if seen is not None and seen.expiry > self._clock() else None

    def mark_accepted(self, webhook_id: str, event_id: str) -> None:
        """Remember what `webhook_id`'s callback was written as, for its retries."""
        seen = self._seen.get(webhook_id)
        if seen is not None:
            seen.event_id = event_id

    def release(self, webhook_id: str) -> None:
        """Forget `webhook_id`, so the sender may retry it (after an answer it should retry)."""
        self._seen.pop(webhook_id, None)

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest.expiry > now:
                return
            self._seen.popitem(last=False)


class SignatureCheck:
    """Verifies Standard Webhooks signatures against several secrets; rejects replays."""

    def __init__(
        self,
        keys: tuple[bytes, ...],
        *,
        tolerance: float,
        wall_clock: Callable[[], float] = time.time,
        remembered_ids: int = REMEMBERED_IDS,
        on_early_eviction: Callable[[], None] | None = None,
    ) -> None:
        if not keys:
            raise ValueError("SignatureCheck needs at least one key")
        self._keys = keys
        self._tolerance = tolerance
        self._wall_clock = wall_clock
        # A timestamp is fresh for `tolerance` either side of now: remember ids that long.
        self.replays = ReplayGuard(
            ttl=2 * tolerance, size=remembered_ids, on_early_eviction=on_early_eviction
        )

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verdict:
        """Check the signature; the webhook id is not claimed yet (see `ReplayGuard.claim`)."""
        webhook_id = headers.get(ID_HEADER, "")
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        presented = _presented(headers.get(SIGNATURE_HEADER, ""))
        usable = bool(webhook_id) and len(webhook_id) <= MAX_ID_LENGTH and self._fresh(timestamp)
        matched = False
        for key in self._keys:
            expected = _digest(key, webhook_id, timestamp, body)
            for candidate in presented or [_PLACEHOLDER]:
                # No early exit: the time taken does not tell which secret or entry matched.
                matched |= hmac.compare_digest(candidate, expected)
        valid = usable and matched and bool(presented)
        return Verdict(valid, webhook_id if valid else None)

    def _fresh(self, timestamp: str) -> bool:
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            return False
        return abs(self._wall_clock() - int(timestamp)) <= self._tolerance
