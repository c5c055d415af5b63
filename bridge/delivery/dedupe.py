"""A bounded, expiring set of ids: acknowledged event ids, used webhook ids."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class DedupeWindow:
    """Ids seen recently, bounded in count and age.

    A plain ordered dict: insertion order is expiry order because every entry
    lives for the same time.
    """

    def __init__(
        self, *, size: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._expiries: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        expiry = self._expiries.get(event_id)
        return expiry is not None and expiry > self._clock()

    def __len__(self) -> int:
        return len(self._expiries)

    def discard(self, event_id: str) -> None:
        """Forget `event_id` (absent is fine)."""
        self._expiries.pop(event_id, None)

    def add(self, event_id: str) -> None:
        if self._size == 0:
            return
        now = self._clock()
        self._expiries.pop(event_id, None)
        self._expiries[event_id] = now + self._ttl
        while self._expiries and (
            len(self._expiries) > self._size or next(iter(self._expiries.values())) <= now
        ):
            self._expiries.popitem(last=False)
