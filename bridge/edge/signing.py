"""Standard Webhooks signatures, for senders or gateways that sign (Luma itself does not).

A signed request carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature` (space-separated `v1,<base64 HMAC-SHA256>` entries) over
`{id}.{timestamp}.{body}`. A request is genuine when one of its signatures matches
one of the configured secrets (several, for rotation), its timestamp is within the
tolerance of now, and its id was not already used within that tolerance.

Every presented signature is compared with every expected one without an early
exit, so the time taken does not tell which part was wrong. The stdlib `hmac`
module is used rather than a webhook library: what we need is twenty lines, and
the library would not do the replay check or the no-early-exit comparison.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bridge.delivery.dedupe import DedupeWindow

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


class ReplayGuard:
    """Webhook ids already used, each remembered for as long as its timestamp is acceptable."""

    def __init__(
        self, *, ttl: float, size: int = REMEMBERED_IDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._used = DedupeWindow(size=size, ttl=ttl, clock=clock)

    def claim(self, webhook_id: str) -> bool:
        """Record `webhook_id` as used; False if it already was (a replay)."""
        if webhook_id in self._used:
            return False
        self._used.add(webhook_id)
        return True

    def release(self, webhook_id: str) -> None:
        """Forget `webhook_id`, so the sender may retry it (after an answer it should retry)."""
        self._used.discard(webhook_id)


class SignatureCheck:
    """Verifies Standard Webhooks signatures against several secrets; rejects replays."""

    def __init__(
        self,
        keys: tuple[bytes, ...],
        *,
        tolerance: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("SignatureCheck needs at least one key")
        self._keys = keys
        self._tolerance = tolerance
        self._wall_clock = wall_clock
        self.replays = ReplayGuard(ttl=2 * tolerance)

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
