"""What the pipeline asks before it writes a callback: does Luma's API confirm it?

Luma signs nothing, so anyone who learns the callback URL can post a forged
generation. With `LUMA_BRIDGE_VERIFY` on, the pipeline hands each new callback
to a `CallbackVerifier` before writing it and follows its `Verdict`: write it
(with the header `luma-verified`), refuse it (401, written nowhere), or answer
503 so Luma retries. The verifier itself talks to Luma's API and lives with the
rest of that client (`bridge.reconcile.verify`); the server composes the two, so
the request path never imports Luma's client, and with verification off it is
never loaded.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from bridge.contract.callback import VERIFIED_HEADER, Callback

__all__ = ["VERIFIED_HEADER", "Action", "CallbackVerifier", "Verdict", "Verified"]


class Verified(enum.StrEnum):
    """What Luma's API said about a callback: the value of the `luma-verified` header
    (`bridge.contract.callback.VERIFIED_VALUES`)."""

    TRUE = "true"
    FALSE = "false"
    UNKNOWN = "unknown"


class Action(enum.Enum):
    """What the pipeline does with the callback."""

    WRITE = "write"
    REFUSE = "refuse"  # 401, written nowhere
    RETRY_LATER = "retry_later"  # 503: Luma retries


@dataclass(frozen=True, slots=True)
class Verdict:
    """A verifier's answer. `reason` goes into the error body: it never holds a secret."""

    verified: Verified
    action: Action
    reason: str = ""


class CallbackVerifier(Protocol):
    """Checks a callback against Luma's API, within a bounded time; never raises."""

    async def verify(self, callback: Callback) -> Verdict: ...
