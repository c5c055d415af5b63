"""The fault audit on its own: it must see each kind of breach it claims to count."""

from __future__ import annotations

from tests.faults.harness import Arrival, Landed, audit_lifecycle


def arrival(event: str, state: str, sent: float) -> Arrival:
    return Arrival(event, "g", state, sent, sent + 0.01)


ARRIVALS = [
    arrival("q", "queued", 0.0),
    arrival("d", "dreaming", 0.2),
    arrival("c", "completed", 0.4),
]


def topic(*events: str) -> list[Landed]:
    state = {"q": "queued", "d": "dreaming", "c": "completed"}
    stamp = {"q": "T00:00:00.000Z", "d": "T00:00:00.200Z", "c": "T00:00:00.400Z"}
    return [Landed(e, "g", state[e], 0, n, stamp[e]) for n, e in enumerate(events)]


def test_a_clean_history_has_nothing_to_report() -> None:
    result = audit_lifecycle(topic("q", "d", "c"), ARRIVALS)
    assert (result.missing, result.order_violations, result.duplicates, result.regressions) == (
        0,
        0,
        0,
        0,
    )
    assert result.ordered_pairs_checked == 2


def test_a_later_state_first_is_an_order_violation_and_a_regression() -> None:
    result = audit_lifecycle(topic("d", "q", "c"), ARRIVALS)
    assert result.order_violations == 1
    assert result.regressions == 1
    assert result.regressions_by_bridge == 1


def test_a_late_copy_of_an_earlier_state_is_a_duplicate_a_violation_and_a_regression() -> None:
    result = audit_lifecycle(topic("q", "d", "q", "c"), ARRIVALS)
    assert result.duplicates == 1
    assert result.order_violations == 1
    assert result.regressions == 1


def test_an_adjacent_copy_is_only_a_duplicate() -> None:
    result = audit_lifecycle(topic("q", "q", "d", "c"), ARRIVALS)
    assert (result.duplicates, result.order_violations, result.regressions) == (1, 0, 0)


def test_callbacks_the_bridge_read_together_are_not_judged() -> None:
    together = [Landed("d", "g", "dreaming", 0, 0, "T1"), Landed("q", "g", "queued", 0, 1, "T1")]
    result = audit_lifecycle(together, ARRIVALS[:2])
    assert result.ordered_pairs_checked == 0
    assert result.regressions == 1  # a plain consumer still sees it
    assert result.regressions_by_bridge == 0  # but the bridge received them that way


def test_missing_is_counted_and_close_arrivals_are_not_judged() -> None:
    close = [arrival("q", "queued", 0.0), arrival("d", "dreaming", 0.05)]
    result = audit_lifecycle(topic("d"), close)
    assert result.missing == 1
    assert result.ordered_pairs_checked == 0
