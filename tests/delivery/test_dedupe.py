"""The expiring id set behind redelivery answers and webhook replay refusal, on a fake clock."""

from __future__ import annotations

from bridge.delivery.dedupe import DedupeWindow


class Clock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def window(size: int = 10, ttl: float = 60.0) -> tuple[DedupeWindow, Clock]:
    clock = Clock()
    return DedupeWindow(size=size, ttl=ttl, clock=clock), clock


def test_an_id_is_remembered_for_exactly_the_ttl() -> None:
    ids, clock = window(ttl=60)
    ids.add("a")
    clock.now += 59.999
    assert "a" in ids
    clock.now += 0.001
    assert "a" not in ids


def test_expired_ids_are_dropped_when_a_new_one_is_added() -> None:
    ids, clock = window(ttl=60)
    ids.add("a")
    ids.add("b")
    clock.now += 30
    ids.add("c")
    assert len(ids) == 3
    clock.now += 30
    ids.add("d")
    assert len(ids) == 2
    assert "c" in ids
    assert "d" in ids


def test_beyond_the_size_the_oldest_id_is_evicted() -> None:
    ids, _ = window(size=3)
    for name in "abcd":
        ids.add(name)
    assert len(ids) == 3
    assert "a" not in ids
    assert all(name in ids for name in "bcd")


def test_adding_an_id_again_renews_it() -> None:
    ids, clock = window(size=2, ttl=60)
    ids.add("a")
    clock.now += 50
    ids.add("b")
    ids.add("a")  # now the newest, with a fresh ttl
    ids.add("c")  # evicts the oldest: b
    assert "b" not in ids
    assert "a" in ids
    clock.now += 59
    assert "a" in ids


def test_size_zero_remembers_nothing() -> None:
    ids, _ = window(size=0)
    ids.add("a")
    assert "a" not in ids
    assert len(ids) == 0


def test_size_one_keeps_the_newest() -> None:
    ids, _ = window(size=1)
    ids.add("a")
    ids.add("b")
    assert "a" not in ids
    assert "b" in ids
    assert len(ids) == 1


def test_discard_forgets_and_tolerates_absence() -> None:
    ids, _ = window()
    ids.add("a")
    ids.add("b")
    ids.discard("a")
    ids.discard("never-added")
    assert "a" not in ids
    assert "b" in ids
    assert len(ids) == 1
