"""The fault audit on its own: it must see each kind of breach it claims to count."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from tests.faults.harness import Arrival, Landed, audit_lifecycle, output_of


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


async def test_a_load_generator_does_not_outlive_a_scenario_that_ends_first(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    running = asyncio.create_task(output_of([sys.executable, "-c", child]))
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child did not start"
        await asyncio.sleep(0.02)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)
