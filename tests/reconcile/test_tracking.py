"""The reconciler's bookkeeping, and the pure rules it decides by."""

from __future__ import annotations

from typing import Any

from aiokafka.partitioner import murmur2

from bridge.contract.callback import parse_callback, redact_callback_token, transition_id
from bridge.reconcile.reconciler import belongs_to_bridge, partition_of
from bridge.reconcile.tracking import Tracked, Tracker, decode_entry, encode_entry


def tracker_with(*partitions: int) -> Tracker:
    tracker = Tracker()
    for partition in partitions:
        tracker.assign(partition)
    return tracker


def test_states_only_move_forward_and_terminal_ends_tracking() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "queued", 10.0)
    tracker.observe(0, "g", "dreaming", 20.0)
    tracker.observe(0, "g", "queued", 30.0)  # a late redelivery: not a step back
    entry = tracker.get(0, "g")
    assert entry == Tracked("dreaming", 20.0)
    assert tracker.tracked() == 1
    tracker.observe(0, "g", "completed", 40.0)
    assert tracker.get(0, "g") == Tracked("completed", 40.0, done=True)
    assert tracker.tracked() == 0
    tracker.observe(0, "g", "failed", 50.0)
    assert tracker.get(0, "g") == Tracked("completed", 40.0, done=True)


def test_unknown_states_and_unowned_partitions_are_ignored() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "paused", 10.0)
    tracker.observe(1, "h", "queued", 10.0)
    assert tracker.get(0, "g") is None
    assert tracker.get(1, "h") is None


def test_stuck_is_silent_longer_than_the_threshold_oldest_first() -> None:
    tracker = tracker_with(0, 1)
    tracker.observe(0, "recent", "dreaming", 95.0)
    tracker.observe(0, "old", "queued", 10.0)
    tracker.observe(1, "older", "dreaming", 5.0)
    tracker.observe(1, "done", "queued", 1.0)
    tracker.observe(1, "done", "failed", 2.0)
    assert [g for _, g, _ in tracker.stuck(100.0, 60.0)] == ["older", "old"]
    tracker.confirm(1, "older", 99.0)  # Luma said nothing new: wait a full period again
    assert [g for _, g, _ in tracker.stuck(100.0, 60.0)] == ["old"]
    tracker.finish(0, "old", 100.0)  # Luma does not know it
    assert [g for _, g, _ in tracker.stuck(1000.0, 60.0)] == ["recent", "older"]


def test_changes_are_collected_once_and_can_be_kept_after_a_failure() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "g", "queued", 1.0)
    changes = tracker.take_changes()
    assert changes == {0: {"g": Tracked("queued", 1.0)}}
    assert tracker.take_changes() == {}
    tracker.keep_changes(changes)
    assert set(tracker.take_changes()[0]) == {"g"}


def test_finished_entries_expire_into_tombstones() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "done", "completed", 10.0)
    tracker.observe(0, "open", "dreaming", 10.0)
    tracker.take_changes()
    tracker.prune(older_than=100.0)
    assert tracker.get(0, "done") is None
    assert tracker.get(0, "open") is not None
    assert tracker.take_changes() == {0: {"done": None}}


def test_the_changelog_merges_with_records_read_meanwhile() -> None:
    tracker = tracker_with(0)
    tracker.observe(0, "a", "dreaming", 50.0)  # read while the changelog loaded
    tracker.observe(0, "b", "queued", 60.0)
    tracker.restore(
        0,
        {
            "a": Tracked("queued", 40.0, checked_at=45.0),
            "b": Tracked("completed", 55.0, done=True),
            "c": Tracked("dreaming", 30.0),
        },
    )
    assert tracker.get(0, "a") == Tracked("dreaming", 50.0, checked_at=45.0)
    assert tracker.get(0, "b") == Tracked("completed", 60.0, done=True)
    assert tracker.get(0, "c") == Tracked("dreaming", 30.0)


def test_changelog_values_round_trip_and_tombstones_read_as_none() -> None:
    entry = Tracked("dreaming", 1.5, checked_at=2.5, done=False)
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(None) is None
    assert decode_entry(b"") is None
    assert decode_entry(b"{not json") is None
    assert decode_entry(b'{"seen_at": 1}') is None


def test_a_bridge_url_prefix_ends_at_a_path_boundary() -> None:
    public = "https://bridge.example.com/luma/callback"
    assert belongs_to_bridge(public + "/tok", public)
    assert belongs_to_bridge(public + "?token=x", public)
    assert belongs_to_bridge(public, public + "/")
    assert not belongs_to_bridge(public + "-other/tok", public)
    assert not belongs_to_bridge("https://elsewhere.example.com/luma/callback/tok", public)
    assert not belongs_to_bridge(None, public)


def test_partition_of_matches_the_producers_murmur2() -> None:
    for generation_id in ("a", "d1ad97c4-9d8f-4e3a-9c2e-3b8c0b9b1e2a", "雪"):
        expected = (murmur2(generation_id.encode()) & 0x7FFFFFFF) % 6
        assert partition_of(generation_id, 6) == expected


def test_transition_id_is_the_same_for_a_callback_and_an_api_read() -> None:
    callback = b'{"id":"g","state":"completed","assets":{"video":"v"},"created_at":null}'
    api_read = b'{"state":"completed","id":"g","request":{"prompt":"p"},"assets":{"video":"v"}}'
    first, second = parse_callback(callback), parse_callback(api_read)
    assert first.event_id != second.event_id
    assert (
        first.transition_id
        == second.transition_id
        == transition_id("g", "completed", {"video": "v"})
    )
    progress = parse_callback(b'{"id":"g","state":"dreaming","assets":{"progress_video":"p1"}}')
    later = parse_callback(b'{"id":"g","state":"dreaming","assets":{"progress_video":"p2"}}')
    assert progress.transition_id != later.transition_id


def test_the_write_token_is_redacted_from_what_luma_echoes() -> None:
    document: dict[str, Any] = {
        "id": "g",
        "request": {"callback_url": "https://b.example/luma/callback/secret"},
    }
    redacted = redact_callback_token(document, "/luma/callback")
    assert redacted["request"]["callback_url"] == "https://b.example/luma/callback/REDACTED"
    assert document["request"]["callback_url"].endswith("/secret")  # not mutated
    query: dict[str, Any] = {
        "id": "g",
        "request": {"callback_url": "https://b.example/hook?token=secret&x=1"},
    }
    assert "secret" not in redact_callback_token(query, "/luma/callback")["request"]["callback_url"]
    elsewhere: dict[str, Any] = {"id": "g", "request": {"callback_url": "https://b.example/other"}}
    assert redact_callback_token(elsewhere, "/luma/callback") is elsewhere
