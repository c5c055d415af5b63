"""The ordered path's details that `test_lanes.py` leaves open (found by mutation testing):
what each error says, the operator's log lines and their fields, lanes freed on every
failure path, the dead-letter copy's conditions, producer renewal that fails, the stall
clock, the lookup's window, and shutdown (`settle`, `busy`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import aiokafka.errors as aiokafka_errors
import pytest
from prometheus_client import CollectorRegistry

import bridge.delivery.lanes as lanes_module
from bridge.delivery.lanes import LOOKUP_SECONDS, Lanes, Refused, Unavailable, Written
from bridge.delivery.publisher import KafkaUnavailable, Placement, Record
from bridge.delivery.spool import Spool, SpoolFull, SpoolUnwritable
from bridge.ops.metrics import Metrics
from tests.delivery.test_lanes import ScriptedPublisher, rec, states
from tests.helpers import wait_until


def logged(caplog: pytest.LogCaptureFixture, start: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(start)]


class Parts:
    def __init__(self, spool: Spool, publisher: ScriptedPublisher, metrics: Metrics) -> None:
        self.spool, self.publisher, self.metrics = spool, publisher, metrics
        self.tasks: list[asyncio.Task[None]] = []

    def lanes(self, *, run: bool = True, **options: object) -> Lanes:
        lanes = Lanes(publisher=self.publisher, spool=self.spool, metrics=self.metrics, **options)  # type: ignore[arg-type]
        lanes.open()
        if run:
            self.tasks.append(asyncio.create_task(lanes.run()))
        return lanes

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await spool.open()
    made = Parts(spool, ScriptedPublisher(), metrics)
    try:
        yield made
    finally:
        for task in made.tasks:
            task.cancel()
        await asyncio.gather(*made.tasks, return_exceptions=True)
        await spool.close()


# -- what the caller is told ---------------------------------------------------------------


async def test_a_refused_record_says_which_error_kafka_gave(parts: Parts) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "MessageSizeTooLargeError"
    with pytest.raises(Refused) as caught:
        await lanes.write([rec("g", "queued")], 0.5)
    assert str(caught.value) == caught.value.reason == "MessageSizeTooLargeError"


async def test_without_a_spool_a_lane_busy_past_the_deadline_answers_unavailable_in_time() -> None:
    publisher = ScriptedPublisher()
    lanes = Lanes(publisher=publisher, spool=None, metrics=Metrics(CollectorRegistry()))
    publisher.verdict = lambda r: "hold"
    first = asyncio.create_task(lanes.write([rec("g", "queued")], 5.0))
    await wait_until(lambda: bool(publisher.held), what="the first send pending")
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        await asyncio.wait_for(lanes.write([rec("g", "dreaming")], 0.1), timeout=3)
    assert time.monotonic() - started < 1.0
    assert str(caught.value) == caught.value.reason == "Kafka unavailable: timeout"
    assert not caught.value.spool_full
    publisher.release()
    assert not (await first).spooled


async def test_spooled_behind_a_busy_lane_is_written_with_no_placements(parts: Parts) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    first = asyncio.create_task(lanes.write([rec("g", "queued")], 5.0))
    await wait_until(lambda: bool(parts.publisher.held), what="the first send pending")
    assert await lanes.write([rec("g", "dreaming")], 5.0) == Written((), spooled=True)
    parts.publisher.release()
    assert not (await first).spooled


async def test_a_spool_that_refuses_the_row_behind_a_busy_lane_frees_that_lane(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    first = asyncio.create_task(lanes.write([rec("g", "queued")], 5.0))
    await wait_until(lambda: bool(parts.publisher.held), what="the first send pending")

    async def full(rows: object) -> None:
        raise SpoolFull("full")

    append = parts.spool.append
    monkeypatch.setattr(parts.spool, "append", full)
    with pytest.raises(Unavailable) as caught:
        await lanes.write([rec("g", "dreaming")], 5.0)
    assert caught.value.spool_full
    monkeypatch.setattr(parts.spool, "append", append)
    parts.publisher.verdict = lambda r: None
    parts.publisher.release()
    assert not (await first).spooled
    # Nothing of g is left anywhere: Luma's retry of `dreaming` goes straight to Kafka.
    assert not (await lanes.write([rec("g", "dreaming")], 1.0)).spooled
    assert not lanes.busy()


# -- quarantine and the dead-letter copy -----------------------------------------------------


async def spool_rows(spool: Spool, *records: Record) -> None:
    first = spool.next_seqs(len(records))
    await spool.append([(first + n, record) for n, record in enumerate(records)])


async def steps(lanes: Lanes, count: int = 5) -> None:
    for _ in range(count):
        await lanes.step()
        await asyncio.sleep(0)


async def test_a_quarantined_row_is_logged_with_its_seq_topic_and_reason_and_frees_its_lane(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    await spool_rows(parts.spool, rec("big", "queued"))
    parts.publisher.verdict = lambda r: "RecordTooLargeError"
    lanes = parts.lanes(run=False)
    await steps(lanes)
    assert parts.spool.quarantined == 1
    [line] = logged(caplog, "Kafka refuses a spooled record for good")
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (
        "Kafka refuses a spooled record for good; it is moved to the spool's quarantine "
        "so the records behind it are not held up (see `luma-kafka-bridge spool inspect`)"
    )
    assert line.fields == {  # type: ignore[attr-defined]
        "seq": 1,
        "topic": "t.lifecycle",
        "reason": "RecordTooLargeError",
    }
    assert not lanes.busy()
    parts.publisher.verdict = lambda r: None
    assert not (await lanes.write([rec("big", "dreaming")], 1.0)).spooled


async def test_without_a_dead_letter_topic_a_quarantined_record_is_not_copied(
    parts: Parts,
) -> None:
    await spool_rows(parts.spool, rec("big", "queued"))
    parts.publisher.verdict = lambda r: "RecordTooLargeError"
    lanes = parts.lanes(run=False)
    await steps(lanes)
    assert parts.spool.quarantined == 1
    assert [r.topic for r in parts.publisher.sent] == ["t.lifecycle"]


async def test_a_record_refused_on_the_dead_letter_topic_itself_is_not_copied_there_again(
    parts: Parts,
) -> None:
    await spool_rows(parts.spool, rec("big", "queued", topic="t.dl"))
    parts.publisher.verdict = lambda r: "RecordTooLargeError"
    lanes = parts.lanes(run=False, dead_letter_topic="t.dl")
    await steps(lanes)
    assert parts.spool.quarantined == 1
    assert [r.topic for r in parts.publisher.sent] == ["t.dl"]


async def test_a_refused_dead_letter_copy_is_logged_with_the_reason(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    await spool_rows(parts.spool, rec("big", "queued"))
    parts.publisher.verdict = lambda r: "RecordTooLargeError"
    lanes = parts.lanes(run=False, dead_letter_topic="t.dl")
    await steps(lanes)
    await wait_until(
        lambda: bool(logged(caplog, "the dead-letter topic did not take")), what="logged"
    )
    [line] = logged(caplog, "the dead-letter topic did not take")
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        "the dead-letter topic did not take a copy of a quarantined record; it stays in "
        "the spool's quarantine only (see `luma-kafka-bridge spool inspect`)"
    )
    assert line.fields == {"reason": "RecordTooLargeError"}  # type: ignore[attr-defined]
    assert parts.sample("luma_bridge_deadletters_total", reason="kafka_refused") == 0


async def test_a_doubtful_row_that_is_then_quarantined_is_no_longer_remembered(
    parts: Parts,
) -> None:
    parts.publisher.lookups_fail = True
    parts.publisher.verdict = lambda r: "RequestTimedOutError"
    lanes = parts.lanes()
    assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: bool(parts.publisher.lookups), what="a lookup tried")
    parts.publisher.verdict = lambda r: "RecordTooLargeError"
    await wait_until(lambda: parts.spool.quarantined == 1, timeout=10, what="quarantined")
    assert lanes._doubtful == {}


# -- refused topics, renewal, lookups ---------------------------------------------------------


async def test_a_refused_topic_is_logged_once_per_reason_with_its_fields(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    parts.publisher.verdict = lambda r: "TopicAuthorizationFailedError"
    lanes = parts.lanes()
    assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(
        lambda: parts.sample("luma_bridge_spool_send_failures_total", kind="topic") >= 3,
        timeout=10,
        what="the drainer refused again and again",
    )
    [line] = logged(caplog, "Kafka refuses the topic or this client")
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (
        "Kafka refuses the topic or this client; spooled records wait until an operator "
        "fixes it (ACLs, TOPIC_PREFIX, the topics: `luma-kafka-bridge topics create`)"
    )
    assert line.fields == {  # type: ignore[attr-defined]
        "topic": "t.lifecycle",
        "reason": "TopicAuthorizationFailedError",
    }
    parts.publisher.verdict = lambda r: "ClusterAuthorizationFailedError"
    await wait_until(
        lambda: len(logged(caplog, "Kafka refuses the topic")) == 2,
        timeout=10,
        what="another reason logged",
    )
    assert logged(caplog, "Kafka refuses the topic")[1].fields["reason"] == (  # type: ignore[attr-defined]
        "ClusterAuthorizationFailedError"
    )


class RenewFailsTwice(ScriptedPublisher):
    """Refuses every send (an unusable producer) until a renewal succeeds, the third."""

    def __init__(self) -> None:
        super().__init__()
        self.verdict = lambda r: "OutOfOrderSequenceNumber"

    async def renew(self) -> None:
        await super().renew()
        if self.renewals < 3:
            raise KafkaUnavailable("timeout")
        self.verdict = lambda r: None


async def test_a_renewal_that_cannot_reach_kafka_is_tried_again_and_nothing_sent_meanwhile(
    tmp_path: Path,
) -> None:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await spool.open()
    publisher = RenewFailsTwice()
    lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics)
    lanes.open()
    drainer = asyncio.create_task(lanes.run())
    try:
        assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
        await wait_until(lambda: spool.records == 0, timeout=10, what="drained after renewal")
        assert publisher.renewals == 3
        # The direct send, then one send with the renewed producer: none with the old one.
        assert [r.value for r in publisher.sent] == [b"g:queued", b"g:queued"]
        assert states(publisher.landed, "g") == ["queued"]
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        await spool.close()


class WithinRecorded(ScriptedPublisher):
    def __init__(self) -> None:
        super().__init__()
        self.withins: list[float] = []

    async def find(self, records: Sequence[Record], since_ms: int, within: float) -> list[bool]:
        self.withins.append(within)
        return await super().find(records, since_ms, within)


async def test_a_lookup_is_bounded_and_its_failure_is_logged_with_its_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await spool.open()
    publisher = WithinRecorded()
    publisher.lookups_fail = True
    publisher.verdict = lambda r: "RequestTimedOutError"
    lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics)
    lanes.open()
    drainer = asyncio.create_task(lanes.run())
    try:
        assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
        await wait_until(lambda: bool(publisher.lookups), what="a lookup tried")
        publisher.verdict = lambda r: None
        await wait_until(lambda: spool.records == 0, timeout=10, what="drained")
        assert publisher.withins[0] == LOOKUP_SECONDS
        line = logged(caplog, "cannot look up records")[0]
        assert line.levelno == logging.WARNING
        assert line.getMessage() == (
            "cannot look up records whose send failed without an answer; sending them "
            "again, which may write them twice (the bridge needs read access to its topics)"
        )
        assert line.fields == {"records": 1, "reason": "timeout"}  # type: ignore[attr-defined]
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        await spool.close()


async def test_the_lookup_searches_from_the_first_failed_send_not_the_latest(
    parts: Parts,
) -> None:
    """Sent, failed without an answer, sent again and failed again: the record may be from
    either send, so the search starts before the first."""
    parts.publisher.lookups_fail = True
    parts.publisher.verdict = lambda r: "RequestTimedOutError"
    lanes = parts.lanes()
    assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: len(parts.publisher.sent) >= 3, timeout=10, what="sent again")
    parts.publisher.lookups_fail = False
    parts.publisher.verdict = lambda r: None
    await wait_until(lambda: parts.spool.records == 0, timeout=10, what="drained")
    sinces = {since for _, since in parts.publisher.lookups}
    assert len(sinces) == 1, sinces


# -- the stall clock ----------------------------------------------------------------------


def test_without_a_spool_nothing_stalls() -> None:
    lanes = Lanes(
        publisher=ScriptedPublisher(),
        spool=None,
        metrics=Metrics(CollectorRegistry()),
        stall_seconds=0.0,
    )
    assert not lanes.stalled()


async def test_an_empty_spool_never_stalls_and_restarts_the_clock(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(
        lanes_module, "time", SimpleNamespace(monotonic=lambda: now[0], time_ns=time.time_ns)
    )
    lanes = parts.lanes(run=False, stall_seconds=10.0)
    now[0] = 200.0
    assert not lanes.stalled()  # nothing waits: no stall, however long since progress
    await spool_rows(parts.spool, rec("g", "queued"))
    now[0] = 210.0
    assert not lanes.stalled()  # exactly the stall time since the spool was last empty
    now[0] = 210.5
    assert lanes.stalled()


# -- shutdown: busy and settle ----------------------------------------------------------------


async def test_busy_while_anything_is_unresolved(parts: Parts) -> None:
    await spool_rows(parts.spool, rec("left", "queued"))  # a previous process's row
    unopened = Lanes(publisher=parts.publisher, spool=parts.spool, metrics=parts.metrics)
    assert unopened.busy()  # by the spool's rows alone
    idle = Lanes(publisher=parts.publisher, spool=None, metrics=parts.metrics)
    assert not idle.busy()
    parts.publisher.verdict = lambda r: "hold"
    sending = asyncio.create_task(idle.write([rec("g", "queued")], 5.0))
    await wait_until(lambda: bool(parts.publisher.held), what="a send pending")
    assert idle.busy()  # by the send in progress alone
    parts.publisher.release()
    await sending
    assert not idle.busy()


async def test_settle_returns_at_once_when_nothing_is_unresolved(parts: Parts) -> None:
    lanes = parts.lanes()
    started = time.monotonic()
    await lanes.settle(time.monotonic() + 5.0)
    assert time.monotonic() - started < 0.5


async def test_settle_drains_the_spool_before_the_deadline(parts: Parts) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    assert (await lanes.write([rec("g", "dreaming")], 0.05)).spooled
    parts.publisher.verdict = lambda r: None
    parts.publisher.release()
    started = time.monotonic()
    await lanes.settle(time.monotonic() + 5.0)
    assert time.monotonic() - started < 4.0
    assert parts.spool.records == 0
    assert not lanes.busy()
    assert states(parts.publisher.landed, "g") == ["queued", "dreaming"]


async def test_settle_gives_up_at_the_deadline_while_kafka_is_away(parts: Parts) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    started = time.monotonic()
    await lanes.settle(started + 0.5)
    took = time.monotonic() - started
    assert 0.45 <= took < 0.95, took  # waits of at most 0.2 s, the last cut at the deadline
    assert parts.spool.records == 1  # kept for the next start


async def test_settle_deletes_acknowledged_rows_even_without_a_drainer(parts: Parts) -> None:
    lanes = parts.lanes(run=False)
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    parts.publisher.release()  # a late acknowledgement: the row is to be deleted
    await asyncio.sleep(0)
    assert parts.spool.records == 1
    await lanes.settle(time.monotonic() + 0.3)
    assert parts.spool.records == 0
    assert not lanes.busy()


async def test_settle_warns_when_acknowledged_rows_cannot_be_deleted_in_time(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lanes = parts.lanes(run=False)
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    parts.publisher.release()
    await asyncio.sleep(0)

    async def stuck_remove(seqs: object) -> None:
        await asyncio.sleep(30)

    monkeypatch.setattr(parts.spool, "remove", stuck_remove)
    started = time.monotonic()
    await lanes.settle(started + 0.2)
    took = time.monotonic() - started
    assert 0.25 <= took < 1.0, took  # the deadline, then 0.1 s for the delete
    [line] = logged(caplog, "could not delete acknowledged rows")
    assert line.levelno == logging.WARNING
    assert line.getMessage() == "could not delete acknowledged rows in time; they are sent again"


# -- the drainer's rounds: backoff, the window, the scan ------------------------------------


class Batches(ScriptedPublisher):
    """Remembers how many records each `send` call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def send(self, records: Sequence[Record]) -> list[asyncio.Future[Placement]]:
        self.batches.append(len(records))
        return super().send(records)


async def rounds(lanes: Lanes, count: int = 1) -> None:
    """Drainer rounds by hand: each lets send callbacks run first."""
    for _ in range(count):
        await asyncio.sleep(0)
        await lanes.step()


async def test_failed_rounds_back_off_doubling_up_to_the_cap_and_not_sending_meanwhile(
    parts: Parts,
) -> None:
    await spool_rows(parts.spool, rec("g", "queued"))
    parts.publisher.verdict = lambda r: "NotConnected"
    lanes = parts.lanes(run=False)
    loop = asyncio.get_running_loop()
    expected = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    for backoff in expected:
        lanes._retry_at = 0.0  # the backoff has passed
        sends = len(parts.publisher.sent)
        await rounds(lanes)
        assert len(parts.publisher.sent) == sends + 1
        await rounds(lanes)  # takes the failure
        assert lanes._retry_at - loop.time() == pytest.approx(backoff, abs=0.05)
        await rounds(lanes, 3)  # within the backoff: nothing is sent
        assert len(parts.publisher.sent) == sends + 1
    parts.publisher.verdict = lambda r: None
    lanes._retry_at = 0.0
    await rounds(lanes, 3)
    assert parts.spool.records == 0
    assert lanes._backoff == 0.2  # progress resets it
    assert lanes._sending_bytes == 0


async def test_a_delivery_resets_the_backoff_and_the_stall_clock(parts: Parts) -> None:
    await spool_rows(parts.spool, rec("a", "queued"), rec("b", "queued"))
    parts.publisher.verdict = lambda r: "NotConnected" if r.key == b"b" else None
    lanes = parts.lanes(run=False)
    await rounds(lanes, 3)
    assert parts.spool.records == 1
    assert not lanes.stalled()  # a was delivered just now
    lanes._retry_at = 0.0
    await rounds(lanes, 2)  # b fails again after a's progress: a backoff from 0.2 again
    assert lanes._retry_at - asyncio.get_running_loop().time() == pytest.approx(0.4, abs=0.05)


async def test_the_window_bounds_the_records_in_flight(parts: Parts) -> None:
    await spool_rows(parts.spool, *(rec(f"g{n}", "queued") for n in range(6)))
    publisher = Batches()
    publisher.verdict = lambda r: "hold"
    parts.publisher = publisher
    lanes = parts.lanes(run=False)
    lanes.WINDOW_RECORDS = 2
    await rounds(lanes)
    lanes._unblocked()  # something else changed: a new round, still no room
    await rounds(lanes)
    assert publisher.batches == [2]
    publisher.verdict = lambda r: None
    publisher.release()
    await rounds(lanes, 6)
    assert publisher.batches[:3] == [2, 2, 2]
    assert parts.spool.records == 0


async def test_the_byte_window_counts_what_is_in_flight(parts: Parts) -> None:
    await spool_rows(parts.spool, *(rec(f"g{n}", "queued") for n in range(8)))
    [(_, _, size)] = (await parts.spool.index(0, 1))[:1]
    publisher = Batches()
    parts.publisher = publisher
    lanes = parts.lanes(run=False)
    lanes.WINDOW_BYTES = int(2.5 * size)  # two rows fit, a third does not
    await rounds(lanes, 8)
    assert parts.spool.records == 0
    assert publisher.batches == [2, 2, 2, 2]  # room freed as each batch is acknowledged


async def test_a_row_beyond_a_full_byte_window_waits_for_room(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spool_rows(parts.spool, *(rec(f"g{n}", "queued") for n in range(6)))
    [(_, _, size)] = (await parts.spool.index(0, 1))[:1]
    publisher = Batches()
    publisher.verdict = lambda r: "hold"
    parts.publisher = publisher
    lanes = parts.lanes(run=False)
    lanes.WINDOW_BYTES = int(2.5 * size)
    calls: list[int] = []
    monkeypatch.setattr(parts.spool, "index", index_in_chunks_of(parts.spool, 1000, calls))
    await rounds(lanes)
    assert len(calls) == 1  # the window is full: no further read
    lanes._unblocked()
    await rounds(lanes)
    # The window is counted with what is still in flight: no room for a third row.
    assert publisher.batches == [2]
    assert lanes._sending_bytes <= lanes.WINDOW_BYTES
    publisher.verdict = lambda r: None
    publisher.release()
    await rounds(lanes, 6)
    assert parts.spool.records == 0
    assert publisher.batches[1:] == [2, 2]


async def test_a_row_larger_than_the_byte_window_goes_alone_once_nothing_is_in_flight(
    parts: Parts,
) -> None:
    await spool_rows(parts.spool, rec("small", "queued"))
    big_record = rec("big", "queued")
    await spool_rows(parts.spool, Record(big_record.topic, big_record.key, b"x" * 4096, []))
    [(_, _, small), (_, _, big)] = await parts.spool.index(0, 2)
    publisher = Batches()
    publisher.verdict = lambda r: "hold"
    parts.publisher = publisher
    lanes = parts.lanes(run=False)
    lanes.WINDOW_BYTES = 2 * small
    assert big > lanes.WINDOW_BYTES
    await rounds(lanes)
    lanes._unblocked()
    await rounds(lanes)
    assert publisher.batches == [1]  # the big row waits for the small one's answer
    publisher.verdict = lambda r: None
    publisher.release()
    await rounds(lanes, 4)
    assert publisher.batches == [1, 1]  # then it goes, alone: it must go some time
    assert parts.spool.records == 0


def index_in_chunks_of(spool: Spool, chunk: int, calls: list[int]) -> object:
    index = spool.index

    async def chunked(after: int = 0, limit: int = 500) -> list[tuple[int, object, int]]:
        calls.append(after)
        return await index(after, min(limit, chunk))  # type: ignore[return-value]

    return chunked


@pytest.mark.parametrize(
    ("window", "scan", "sent"), [(3, 4000, 3), (100, 2, 2), (100, 1, 2), (100, 3, 4)]
)
async def test_a_round_reads_the_spool_until_the_window_or_the_scan_limit_is_reached(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, window: int, scan: int, sent: int
) -> None:
    await spool_rows(parts.spool, *(rec(f"g{n}", "queued") for n in range(6)))
    calls: list[int] = []
    monkeypatch.setattr(parts.spool, "index", index_in_chunks_of(parts.spool, 2, calls))
    parts.publisher.verdict = lambda r: "hold"
    lanes = parts.lanes(run=False)
    lanes.WINDOW_RECORDS = window
    lanes.SCAN_ROWS = scan
    await rounds(lanes)
    assert len(parts.publisher.sent) == sent


async def test_a_round_with_nothing_new_reads_nothing(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(parts.spool, "index", index_in_chunks_of(parts.spool, 1000, calls))
    lanes = parts.lanes(run=False)
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    assert (await lanes.write([rec("g", "dreaming")], 0.05)).spooled  # behind queued
    await rounds(lanes)
    reads = len(calls)
    assert reads >= 1  # looked: g is busy, nothing to send
    lanes.wakeup.set()  # woken without a change
    await rounds(lanes, 3)
    assert len(calls) == reads
    assert len(parts.publisher.sent) == 1


async def test_while_every_row_is_still_in_the_producer_the_spool_is_not_read(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(parts.spool, "index", index_in_chunks_of(parts.spool, 1000, calls))
    lanes = parts.lanes(run=False)
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("a", "queued")], 0.05)).spooled
    assert (await lanes.write([rec("b", "queued")], 0.05)).spooled
    lanes._unblocked()
    await rounds(lanes, 2)
    assert calls == []  # both rows pinned to their pending sends: nothing to look for


async def test_an_idle_drainer_does_not_spin_while_rows_wait_behind_a_busy_lane(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(parts.spool, "index", index_in_chunks_of(parts.spool, 1000, calls))
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    assert (await lanes.write([rec("g", "dreaming")], 0.05)).spooled
    lanes.wakeup.set()
    await asyncio.sleep(0.3)
    assert len(calls) <= 2  # not a read every round pause


async def test_a_row_refused_for_good_after_a_late_failure_frees_its_lane(
    parts: Parts,
) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    parts.publisher.verdict = lambda r: "RecordTooLargeError"
    held, parts.publisher.held = parts.publisher.held, []
    for _, future in held:
        future.set_exception(aiokafka_errors.RecordTooLargeError())
    await wait_until(lambda: parts.spool.quarantined == 1, what="quarantined by the drainer")
    parts.publisher.verdict = lambda r: None
    assert not (await lanes.write([rec("g", "dreaming")], 1.0)).spooled
    assert not lanes.busy()


async def test_a_row_found_by_the_lookup_is_no_longer_doubtful(parts: Parts) -> None:
    parts.publisher.verdict = lambda r: "unanswered"
    lanes = parts.lanes()
    assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: parts.spool.records == 0, timeout=10, what="found and deleted")
    assert parts.sample("luma_bridge_resend_lookups_total", outcome="found") == 1
    assert parts.sample("luma_bridge_resend_lookups_total", outcome="absent") == 0
    assert lanes._doubtful == {}


def fail_held(publisher: ScriptedPublisher, error: BaseException | None) -> None:
    """What Kafka held ends in `error` (None: the sends are cancelled)."""
    held, publisher.held = publisher.held, []
    for _, future in held:
        if error is None:
            future.cancel()
        else:
            future.set_exception(error)


@pytest.mark.parametrize(
    ("error", "renewed"),
    [
        (aiokafka_errors.OutOfOrderSequenceNumber(), True),
        (aiokafka_errors.RequestTimedOutError(), False),
        (None, False),  # cancelled: the producer was stopped or replaced on purpose
    ],
)
async def test_a_late_failure_of_a_spooled_send_renews_the_producer_only_if_it_is_unusable(
    parts: Parts, error: BaseException | None, renewed: bool
) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("g", "queued")], 0.05)).spooled
    parts.publisher.verdict = lambda r: None
    fail_held(parts.publisher, error)
    await wait_until(lambda: parts.spool.records == 0, timeout=10, what="sent again")
    assert (parts.publisher.renewals > 0) is renewed
    assert len(parts.publisher.lookups) == 1  # it may have landed: looked up first
    assert states(parts.publisher.landed, "g") == ["queued"]


async def test_a_row_looked_up_and_absent_is_not_looked_up_again_after_a_send_that_never_left(
    parts: Parts,
) -> None:
    verdicts = iter(["RequestTimedOutError", "NotConnected"])
    parts.publisher.verdict = lambda r: next(verdicts, None)
    lanes = parts.lanes()
    assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: parts.spool.records == 0, timeout=10, what="delivered")
    assert len(parts.publisher.lookups) == 1
    assert parts.sample("luma_bridge_resend_lookups_total", outcome="absent") == 1
    assert parts.sample("luma_bridge_resend_lookups_total", outcome="found") == 0


# -- the direct path's bookkeeping ------------------------------------------------------------


async def test_a_direct_timeout_is_counted_spooled_with_no_placements_and_not_a_renewal(
    parts: Parts,
) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    assert await lanes.write([rec("g", "queued")], 0.05) == Written((), spooled=True)
    assert parts.sample("luma_bridge_kafka_produce_errors_total", reason="timeout") == 1
    parts.publisher.verdict = lambda r: None
    parts.publisher.release()
    await wait_until(lambda: parts.spool.records == 0, what="late acknowledgement")
    assert parts.publisher.renewals == 0


async def test_a_direct_failure_other_than_a_timeout_is_not_counted_as_one(parts: Parts) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "NotConnected"
    assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
    assert parts.sample("luma_bridge_kafka_produce_errors_total", reason="timeout") == 0


async def test_a_refused_record_is_counted_by_its_reason(parts: Parts) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "MessageSizeTooLargeError"
    with pytest.raises(Refused):
        await lanes.write([rec("g", "queued")], 0.5)
    refused = "luma_bridge_kafka_refused_records_total"
    assert parts.sample(refused, reason="MessageSizeTooLargeError") == 1


async def test_a_partly_acknowledged_callback_frees_its_lane_once_the_rest_lands(
    parts: Parts,
) -> None:
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold" if r.topic == "t.queued" else None
    both = [rec("g", "queued"), rec("g", "queued", topic="t.queued")]
    assert (await lanes.write(both, 0.05)).spooled
    parts.publisher.verdict = lambda r: None
    parts.publisher.release()
    await wait_until(lambda: parts.spool.records == 0, what="the late half acknowledged")
    assert not lanes.busy()
    assert not (await lanes.write([rec("g", "dreaming")], 1.0)).spooled


async def test_the_lookup_window_starts_just_before_the_failed_send(parts: Parts) -> None:
    parts.publisher.verdict = lambda r: "RequestTimedOutError"
    lanes = parts.lanes()
    before = time.time_ns() // 1_000_000
    assert (await lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: bool(parts.publisher.lookups), what="a lookup")
    [(_, since_ms)] = parts.publisher.lookups[:1]
    assert isinstance(since_ms, int)
    assert before - 10_000 - 2_000 <= since_ms <= before - 10_000 + 2_000


async def test_spool_drained_is_logged_once_when_the_last_row_goes(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.delivery.lanes")
    await spool_rows(parts.spool, rec("g", "queued"), rec("g", "dreaming"))
    lanes = parts.lanes(run=False)
    await rounds(lanes, 2)  # queued delivered and deleted; dreaming on its way
    assert parts.spool.records == 1
    assert logged(caplog, "spool drained") == []
    await rounds(lanes, 6)
    assert parts.spool.records == 0
    assert len(logged(caplog, "spool drained")) == 1
    assert parts.publisher.renewals == 0


async def test_a_delete_that_fails_is_retried_after_a_backoff_without_sending_again(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spool_rows(parts.spool, rec("g", "queued"))
    remove = parts.spool.remove
    failures = [SpoolUnwritable("disk")]

    async def flaky_remove(seqs: list[int]) -> None:
        if failures:
            raise failures.pop()
        await remove(seqs)

    monkeypatch.setattr(parts.spool, "remove", flaky_remove)
    lanes = parts.lanes(run=False)
    await rounds(lanes, 2)
    assert lanes._retry_at - asyncio.get_running_loop().time() == pytest.approx(0.2, abs=0.05)
    assert parts.spool.records == 1
    await rounds(lanes, 3)
    assert parts.spool.records == 0
    assert len(parts.publisher.sent) == 1  # acknowledged rows are never sent again


async def reopened(parts: Parts, tmp_path: Path) -> Spool:
    await parts.spool.close()
    parts.spool = Spool(tmp_path, max_bytes=8 << 20, metrics=parts.metrics)
    await parts.spool.open()
    return parts.spool


async def test_rows_left_by_a_previous_process_hold_their_lanes_until_delivered(
    parts: Parts, tmp_path: Path
) -> None:
    await spool_rows(parts.spool, rec("g", "queued"), rec("g", "dreaming"), rec("h", "queued"))
    await reopened(parts, tmp_path)
    lanes = parts.lanes(run=False)
    assert lanes.busy()
    await rounds(lanes, 2)  # g:queued and h:queued delivered; g:dreaming sent after
    assert parts.spool.records == 1  # g:dreaming, sent, not yet deleted
    assert (await lanes.write([rec("g", "completed")], 1.0)).spooled  # behind dreaming
    assert not (await lanes.write([rec("h", "dreaming")], 1.0)).spooled  # h is free
    await rounds(lanes, 8)
    assert parts.spool.records == 0
    assert states(parts.publisher.landed, "g") == ["queued", "dreaming", "completed"]
    assert not lanes.busy()
    assert not (await lanes.write([rec("g", "failed")], 1.0)).spooled


def test_the_default_stall_time_is_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(
        lanes_module, "time", SimpleNamespace(monotonic=lambda: now[0], time_ns=time.time_ns)
    )
    spool = SimpleNamespace(records=1)
    lanes = Lanes(publisher=ScriptedPublisher(), spool=spool, metrics=Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    now[0] = 160.0
    assert not lanes.stalled()
    now[0] = 160.5
    assert lanes.stalled()


async def test_a_byte_window_of_exactly_two_rows_takes_two(parts: Parts) -> None:
    await spool_rows(parts.spool, *(rec(f"g{n}", "queued") for n in range(4)))
    [(_, _, size)] = (await parts.spool.index(0, 1))[:1]
    publisher = Batches()
    parts.publisher = publisher
    lanes = parts.lanes(run=False)
    lanes.WINDOW_BYTES = 2 * size
    await rounds(lanes, 4)
    assert publisher.batches == [2, 2]


async def test_while_every_row_is_pinned_or_being_sent_the_spool_is_not_read(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes = parts.lanes(run=False)
    parts.publisher.verdict = lambda r: "hold"
    assert (await lanes.write([rec("a", "queued")], 0.05)).spooled  # pinned
    await spool_rows(parts.spool, rec("b", "queued"))
    lanes._unblocked()
    await rounds(lanes)  # b is sent by the drainer
    assert len(parts.publisher.sent) == 2
    calls: list[int] = []
    monkeypatch.setattr(parts.spool, "index", index_in_chunks_of(parts.spool, 1000, calls))
    lanes._unblocked()
    await rounds(lanes, 2)
    assert calls == []


async def test_the_drainers_own_send_renews_an_unusable_producer(parts: Parts) -> None:
    await spool_rows(parts.spool, rec("g", "queued"))
    parts.publisher.verdict = lambda r: "OutOfOrderSequenceNumber"
    lanes = parts.lanes(run=False)
    await rounds(lanes, 2)
    lanes._retry_at = 0.0
    await rounds(lanes)
    assert parts.publisher.renewals == 1


class RenewNeverReaches(ScriptedPublisher):
    async def renew(self) -> None:
        await super().renew()
        raise KafkaUnavailable("timeout")


async def test_a_failed_renewal_is_tried_again_only_after_the_backoff(tmp_path: Path) -> None:
    """Every new spooled row wakes the drainer: during an outage that is every callback,
    and each wake-up must not build a new producer."""
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await spool.open()
    try:
        await spool_rows(spool, rec("g", "queued"))
        publisher = RenewNeverReaches()
        publisher.verdict = lambda r: "OutOfOrderSequenceNumber"
        lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics)
        lanes.open()
        await rounds(lanes, 2)  # sent, refused: the producer is unusable
        lanes._retry_at = 0.0
        await rounds(lanes)
        assert publisher.renewals == 1
        await rounds(lanes, 5)  # woken again and again within the backoff
        assert publisher.renewals == 1
        lanes._retry_at = 0.0  # the backoff has passed
        await rounds(lanes)
        assert publisher.renewals == 2
    finally:
        await spool.close()


async def test_an_acknowledgement_during_the_spool_write_frees_the_lane(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send outlives the ack timeout, then Kafka acknowledges it while its row is
    being written to the spool: the row is deleted and the lane is free again."""
    insert = parts.spool._insert_sync

    def slow_insert(*args: object) -> int:
        time.sleep(0.3)
        return insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(parts.spool, "_insert_sync", slow_insert)
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    writing = asyncio.create_task(lanes.write([rec("g", "queued")], 0.05))
    await asyncio.sleep(0.15)  # timed out; the row is being written
    parts.publisher.release()
    assert (await writing).spooled
    await wait_until(lambda: parts.spool.records == 0, what="the row deleted")
    monkeypatch.setattr(parts.spool, "_insert_sync", insert)
    parts.publisher.verdict = lambda r: None
    assert not (await lanes.write([rec("g", "dreaming")], 1.0)).spooled
    assert len(parts.publisher.sent) == 2


async def test_a_row_spooled_while_its_lane_frees_is_sent_without_another_event(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane's earlier send is acknowledged while the row behind it is being written to
    the spool: the drainer, woken before the row was there, must still send it."""
    lanes = parts.lanes()
    parts.publisher.verdict = lambda r: "hold"
    first = asyncio.create_task(lanes.write([rec("g", "queued")], 5.0))
    await wait_until(lambda: bool(parts.publisher.held), what="the first send pending")
    parts.publisher.verdict = lambda r: None
    append = parts.spool.append

    async def acknowledged_meanwhile(rows: Sequence[tuple[int, Record]]) -> None:
        parts.publisher.release()  # Kafka answers the first send now
        assert not (await first).spooled  # its lane is released: the drainer is woken
        for _ in range(5):
            await asyncio.sleep(0)  # the drainer's round, with nothing spooled yet
        await append(rows)

    monkeypatch.setattr(parts.spool, "append", acknowledged_meanwhile)
    assert (await lanes.write([rec("g", "dreaming")], 5.0)).spooled
    await wait_until(lambda: parts.spool.records == 0, timeout=5, what="the spooled row sent")
    assert states(parts.publisher.landed, "g") == ["queued", "dreaming"]
