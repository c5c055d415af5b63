"""Per-source rate limit: a token bucket per source address, answered 429 beyond it.

Off by default (`RATE_LIMIT_PER_SECOND=0`): Luma retries a refused callback only
three times, 100 ms apart, so a limit set too low loses events. Behind a proxy the
source is the proxy unless `TRUSTED_PROXIES` names it (see `bridge.edge.access`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

# Sources tracked at once; the least recently seen is forgotten first (it starts full again).
MAX_SOURCES = 100_000


class RateLimiter:
    """`rate` requests per second per key, with bursts of up to `burst`."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._max_sources = max_sources
        self._clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def allow(self, key: Hashable) -> bool:
        """Take one token from `key`'s bucket; False when it is empty."""
        now = self._clock()
        tokens, updated = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - updated) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_sources:
            self._buckets.popitem(last=False)
        return allowed

    @property
    def retry_after(self) -> int:
        """Whole seconds until one token is back (for `Retry-After`)."""
        return max(1, int(-(-1.0 // self._rate)))

    def __len__(self) -> int:
        return len(self._buckets)
