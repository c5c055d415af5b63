"""The tracker's rules at their edges (found by mutation testing): defaults of an old
changelog value, every unreadable value, what counts as a change, the exact thresholds of
`stuck` and `prune`, and partitions handed back."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge.reconcile.tracking import Tracked, Tracker, decode_entry, encode_entry


def tracker_with(*partitions: int) -> Tracker:
    tracker = Tracker()
    for partition in partitions:
        tracker.assign(partition)
    return tracker


def test_a_value_without_the_later_fields_reads_as_unchecked_and_open() -> None:
    assert decode_entry(b'{"state": "queued", "seen_at": 1}') == Tracked("queued", 1.0, 0.0, False)


def test_each_field_is_read_as_its_type() -> None:
    entry = decode_entry(b'{"state": 7, "seen_at": "2.5", "checked_at": "3", "done": 1}')
    assert entry == Tracked("7", 2.5, 3.0, True)
    assert isinstance(entry.state, str)
    assert isinstance(entry.done, bool)


def test_the_value_written_names_every_field() -> None:
    entry = Tracked("completed", 1.5, checked_at=2.5, done=True)
    assert encode_entry(entry) == (
        b'{"state":"completed","seen_at":1.5,"checked_at":2.5,"done":true}'
    )


@pytest.mark.parametrize(
    "value",
    [
        b"null",  # TypeError: not a document
        b"[1, 2]",  # TypeError: a list
        b'{"state": "queued", "seen_at": "soon"}',  # ValueError: not a number
        b'{"state": "queued", "seen_at": null}',  # TypeError: float(None)
        b'{"state": "queued"}',  # KeyError
        b"\xff",  # not JSON
    ],
)
def test_an_unreadable_value_is_none(value: bytes) -> None:
    assert decode_entry(value) is None


def test_a_partition_is_assigned_empty_and_assigning_again_keeps_its_entries() -> None:
    tracker = tracker_with(3)
    assert tracker.partitions == {3}
    tracker.observe(3, "g", "queued", 1.0)
    tracker.assign(3)
    assert tracker.get(3, "g") == Tracked("queued", 1.0)
    assert tracker.take_changes() == {3: {"g": Tracked("queued", 1.0)}}


def test_a_revoked_partition_is_forgotten_with_its_changes() -> None:
    tracker = tracker_with(0, 1)
    tracker.observe(0, "g", "queued", 1.0)
    tracker.observe(1, "h", "queued", 1.0)
    tracker.revoke(0)
    tracker.revoke(7)  # never assigned: nothing happens
    assert tracker.partitions == {1}
    assert tracker.get(0, "g") is None
    assert tracker.take_changes() == {1: {"h": Tracked("queued", 1.0)}}
    tracker.keep_changes({0: {"g": None}, 1: {"h": None}})  # 0 is no longer ours
    assert tracker.take_changes() == {1: {"h": Tracked("queued", 1.0)}}


def test_the_same_state_again_moves_the_time_on_and_counts_as_a_change() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "dreaming", 20.0)
    tracker.take_changes()
    tracker.observe(0, "g", "dreaming", 30.0)
    assert tracker.get(0, "g") == Tracked("dreaming", 30.0)
    assert tracker.take_changes() == {0: {"g": Tracked("dreaming", 30.0)}}
    tracker.observe(0, "g", "dreaming", 25.0)  # an older copy: the time stays
    assert tracker.get(0, "g") == Tracked("dreaming", 30.0)


def test_a_step_back_or_a_record_after_the_end_is_not_a_change() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "dreaming", 20.0)
    tracker.observe(0, "h", "failed", 20.0)
    tracker.take_changes()
    tracker.observe(0, "g", "queued", 40.0)
    tracker.observe(0, "h", "failed", 40.0)
    tracker.observe(0, "h", "completed", 40.0)
    assert tracker.take_changes() == {}
    assert tracker.get(0, "h") == Tracked("failed", 20.0, done=True)


def test_a_later_state_with_an_earlier_time_keeps_the_later_time() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "queued", 50.0)
    tracker.observe(0, "g", "completed", 40.0)
    assert tracker.get(0, "g") == Tracked("completed", 50.0, done=True)


def test_a_new_generation_first_seen_in_a_terminal_state_is_done() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "failed", 5.0)
    tracker.observe(0, "h", "queued", 5.0)
    assert tracker.get(0, "g") == Tracked("failed", 5.0, done=True)
    assert tracker.get(0, "h") == Tracked("queued", 5.0, done=False)
    assert tracker.tracked() == 1


def test_confirm_and_finish_of_an_unknown_generation_change_nothing() -> None:
    tracker = tracker_with(0)
    tracker.confirm(0, "g", 5.0)
    tracker.finish(0, "g", 5.0)
    tracker.confirm(9, "g", 5.0)
    assert tracker.get(0, "g") is None
    assert tracker.take_changes() == {}


def test_confirm_and_finish_are_changes_with_their_times() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "queued", 1.0)
    tracker.observe(0, "h", "queued", 1.0)
    tracker.take_changes()
    tracker.confirm(0, "g", 7.0)
    tracker.finish(0, "h", 8.0)
    assert tracker.take_changes() == {
        0: {"g": Tracked("queued", 1.0, checked_at=7.0), "h": Tracked("queued", 1.0, 8.0, True)}
    }
    assert tracker.get(0, "g").quiet_since == 7.0  # type: ignore[union-attr]


def test_stuck_is_strictly_longer_than_the_threshold() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "queued", 40.0)
    assert tracker.stuck(100.0, 60.0) == []
    assert [g for _, g, _ in tracker.stuck(100.5, 60.0)] == ["g"]
    assert tracker.stuck(100.5, 60.0) == [(0, "g", Tracked("queued", 40.0))]


def test_stuck_orders_by_the_last_news_including_lookups() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "a", "queued", 10.0)
    tracker.observe(0, "b", "queued", 20.0)
    tracker.confirm(0, "a", 30.0)
    assert [g for _, g, _ in tracker.stuck(1000.0, 60.0)] == ["b", "a"]


def test_prune_keeps_an_entry_heard_of_exactly_at_the_limit_and_counts_lookups() -> None:
    tracker = tracker_with(0, 1)
    tracker.observe(0, "edge", "completed", 100.0)
    tracker.observe(1, "old", "completed", 50.0)
    tracker.observe(1, "checked", "queued", 50.0)
    tracker.finish(1, "checked", 150.0)
    tracker.take_changes()
    tracker.prune(older_than=100.0)
    assert tracker.get(0, "edge") is not None
    assert tracker.get(1, "old") is None
    assert tracker.get(1, "checked") is not None  # finished later than it was last seen
    assert tracker.take_changes() == {1: {"old": None}}


def test_restoring_an_unassigned_partition_does_nothing() -> None:
    tracker = tracker_with(0)
    tracker.restore(1, {"g": Tracked("queued", 1.0)})
    assert tracker.partitions == {0}
    assert tracker.get(1, "g") is None
    assert tracker.take_changes() == {}


def test_restored_entries_are_not_changes_but_merged_ones_are() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "live", "queued", 10.0)
    tracker.take_changes()
    tracker.restore(0, {"saved": Tracked("dreaming", 5.0), "live": Tracked("queued", 12.0)})
    assert tracker.get(0, "saved") == Tracked("dreaming", 5.0)
    assert tracker.take_changes() == {0: {"live": Tracked("queued", 12.0)}}


@pytest.mark.parametrize(
    ("live", "saved", "merged"),
    [
        # the same state: the live one stays, times move to the later ones
        (Tracked("dreaming", 10.0), Tracked("dreaming", 5.0, 8.0), Tracked("dreaming", 10.0, 8.0)),
        # a saved later state wins; a saved earlier one does not
        (Tracked("queued", 10.0), Tracked("dreaming", 5.0), Tracked("dreaming", 10.0)),
        (Tracked("dreaming", 10.0), Tracked("queued", 20.0), Tracked("dreaming", 20.0)),
        # a saved end wins even at the same rank, and stays ended
        (
            Tracked("completed", 10.0),
            Tracked("failed", 5.0, done=True),
            Tracked("failed", 10.0, done=True),
        ),
        (
            Tracked("queued", 10.0),
            Tracked("queued", 5.0, done=True),
            Tracked("queued", 10.0, done=True),
        ),
        # a live end stays ended whatever was saved
        (
            Tracked("queued", 10.0, done=True),
            Tracked("dreaming", 5.0),
            Tracked("dreaming", 10.0, done=True),
        ),
        # an unknown saved state never wins over a known live one
        (Tracked("queued", 10.0), Tracked("paused", 5.0), Tracked("queued", 10.0)),
        # a known saved state wins over an unknown live one
        (Tracked("paused", 10.0), Tracked("queued", 5.0), Tracked("queued", 10.0)),
        # two states this version does not know (a newer one wrote them): the live one stays
        (Tracked("paused", 10.0), Tracked("archived", 5.0), Tracked("paused", 10.0)),
        # the same rank, another state, not ended: the live one stays
        (Tracked("completed", 10.0), Tracked("failed", 5.0), Tracked("completed", 10.0)),
    ],
)
def test_restore_merges_forward(live: Tracked, saved: Tracked, merged: Tracked) -> None:
    tracker = tracker_with(0)
    # Copies: the tracker keeps and updates the entries it is given, and the parameters
    # are shared by every run of the test in this process.
    tracker.restore(0, {"g": replace(live)})  # an entry of any state, as a changelog may hold
    tracker.restore(0, {"g": replace(saved)})
    assert tracker.get(0, "g") == merged


def test_a_known_state_moves_on_from_a_restored_unknown_one() -> None:
    tracker = tracker_with(0)
    tracker.restore(0, {"g": Tracked("paused", 1.0)})  # written by a newer version
    tracker.observe(0, "g", "queued", 2.0)
    assert tracker.get(0, "g") == Tracked("queued", 2.0)
