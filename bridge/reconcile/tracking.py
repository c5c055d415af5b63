"""What the reconciler knows about each generation: the last state Kafka holds and when.

Pure bookkeeping, no I/O. Entries are kept per lifecycle partition (the unit a
consumer group moves between reconcilers); changed entries are collected for the
changelog topic, which is how the state survives a restart without a local database.
A terminal state ends tracking but the entry stays (marked done) until it is older
than the discovery lookback, so discovery does not mistake a finished generation for
one Kafka never saw; then it is dropped and tombstoned in the changelog.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from bridge.contract.callback import STATE_RANK, TERMINAL_STATES


@dataclass(slots=True)
class Tracked:
    """One generation: its furthest state in Kafka, when it last got a record, and whether
    Luma's API was asked since."""

    state: str
    seen_at: float
    checked_at: float = 0.0
    done: bool = False

    @property
    def quiet_since(self) -> float:
        """Since when nothing new is known: the last record, or the last lookup that found
        nothing later."""
        return max(self.seen_at, self.checked_at)


def encode_entry(entry: Tracked) -> bytes:
    """A changelog value."""
    return orjson.dumps(
        {
            "state": entry.state,
            "seen_at": entry.seen_at,
            "checked_at": entry.checked_at,
            "done": entry.done,
        }
    )


def decode_entry(value: bytes | None) -> Tracked | None:
    """A changelog value back to an entry; None for a tombstone or anything unreadable."""
    if not value:
        return None
    try:
        document = orjson.loads(value)
        return Tracked(
            state=str(document["state"]),
            seen_at=float(document["seen_at"]),
            checked_at=float(document.get("checked_at", 0.0)),
            done=bool(document.get("done", False)),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class Tracker:
    """Entries by lifecycle partition, and which changed since the last `take_changes()`."""

    def __init__(self) -> None:
        self._partitions: dict[int, dict[str, Tracked]] = {}
        self._changed: dict[int, set[str]] = {}

    @property
    def partitions(self) -> set[int]:
        return set(self._partitions)

    def assign(self, partition: int) -> None:
        """Take over a partition: its records are followed from now on."""
        self._partitions.setdefault(partition, {})
        self._changed.setdefault(partition, set())

    def restore(self, partition: int, entries: dict[str, Tracked]) -> None:
        """Add the entries rebuilt from the changelog to those records gave meanwhile.

        Both only ever move forward, so the further state and the later times win.
        """
        live = self._partitions.get(partition)
        if live is None:
            return
        for generation_id, saved in entries.items():
            entry = live.get(generation_id)
            if entry is None:
                live[generation_id] = saved
                continue
            if STATE_RANK.get(saved.state, -1) > STATE_RANK.get(entry.state, -1) or saved.done:
                entry.state = saved.state
                entry.done = entry.done or saved.done
            entry.seen_at = max(entry.seen_at, saved.seen_at)
            entry.checked_at = max(entry.checked_at, saved.checked_at)
            self._changed[partition].add(generation_id)

    def revoke(self, partition: int) -> None:
        self._partitions.pop(partition, None)
        self._changed.pop(partition, None)

    def get(self, partition: int, generation_id: str) -> Tracked | None:
        return self._partitions.get(partition, {}).get(generation_id)

    def observe(self, partition: int, generation_id: str, state: str, at: float) -> None:
        """A record of `state` landed at `at`. Unknown states and steps back are ignored."""
        entries = self._partitions.get(partition)
        rank = STATE_RANK.get(state)
        if entries is None or rank is None:
            return
        entry = entries.get(generation_id)
        if entry is None:
            entries[generation_id] = Tracked(state, at, done=state in TERMINAL_STATES)
        elif rank >= STATE_RANK.get(entry.state, -1) and not entry.done:
            entry.state = state
            entry.seen_at = max(entry.seen_at, at)
            entry.done = state in TERMINAL_STATES
        else:
            return
        self._changed[partition].add(generation_id)

    def confirm(self, partition: int, generation_id: str, at: float) -> None:
        """Luma's API reported nothing later than Kafka holds: wait a full period again."""
        entry = self.get(partition, generation_id)
        if entry is not None:
            entry.checked_at = at
            self._changed[partition].add(generation_id)

    def finish(self, partition: int, generation_id: str, at: float) -> None:
        """End tracking without a terminal state (Luma's API does not know the generation)."""
        entry = self.get(partition, generation_id)
        if entry is not None:
            entry.done = True
            entry.checked_at = at
            self._changed[partition].add(generation_id)

    def stuck(self, now: float, after: float) -> list[tuple[int, str, Tracked]]:
        """Generations silent in a non-terminal state for longer than `after`, oldest first."""
        found = [
            (partition, generation_id, entry)
            for partition, entries in self._partitions.items()
            for generation_id, entry in entries.items()
            if not entry.done and now - entry.quiet_since > after
        ]
        found.sort(key=lambda item: item[2].quiet_since)
        return found

    def tracked(self) -> int:
        """Generations followed: not yet in a terminal state."""
        return sum(
            1
            for entries in self._partitions.values()
            for entry in entries.values()
            if not entry.done
        )

    def prune(self, older_than: float) -> None:
        """Drop finished entries last heard of before `older_than`; they become tombstones."""
        for partition, entries in self._partitions.items():
            expired = [
                generation_id
                for generation_id, entry in entries.items()
                if entry.done and entry.quiet_since < older_than
            ]
            for generation_id in expired:
                del entries[generation_id]
                self._changed[partition].add(generation_id)

    def take_changes(self) -> dict[int, dict[str, Tracked | None]]:
        """Changed entries by partition (None: dropped), and forget that they changed."""
        changes = {
            partition: {
                generation_id: self._partitions[partition].get(generation_id)
                for generation_id in changed
            }
            for partition, changed in self._changed.items()
            if changed
        }
        for changed in self._changed.values():
            changed.clear()
        return changes

    def keep_changes(self, changes: dict[int, dict[str, Tracked | None]]) -> None:
        """Mark `changes` as changed again (writing them to the changelog failed)."""
        for partition, entries in changes.items():
            if partition in self._changed:
                self._changed[partition].update(entries)
