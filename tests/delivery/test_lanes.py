"""The ordered path on its own, with a scripted producer: order, late acknowledgements,
error classes, quarantine, producer renewal and supervision."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiokafka.errors
import pytest
from prometheus_client import CollectorRegistry

from bridge.delivery.lanes import Lanes, Refused, Unavailable
from bridge.delivery.publisher import (
    KafkaUnavailable,
    NotConnected,
    Placement,
    Record,
    wait_all,
)
from bridge.delivery.spool import Spool
from bridge.ops.metrics import Metrics
from bridge.server import supervise
from tests.helpers import wait_until

Verdict = Callable[[Record], str | None]
ERRORS = {**vars(aiokafka.errors), "NotConnected": NotConnected}


class ScriptedPublisher:
    """Decides each send's fate with `verdict(record)`: None acknowledges, "hold" keeps it
    pending until `release()`, "unanswered" lands it yet fails it with a request timeout
    (the answer was lost), anything else names the aiokafka error it fails with. `find`
    looks in what landed; it fails while `lookups_fail` is set."""

    def __init__(self) -> None:
        self.verdict: Verdict = lambda _: None
        self.sent: list[Record] = []  # every send, in order, copies included
        self.landed: list[Record] = []  # what "Kafka" holds, in order
        self.held: list[tuple[Record, asyncio.Future[Placement]]] = []
        self.renewals = 0
        self.lookups: list[tuple[list[Record], int]] = []
        self.lookups_fail = False

    def send(self, records: Sequence[Record]) -> list[asyncio.Future[Placement]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Placement]] = []
        for record in records:
            self.sent.append(record)
            future: asyncio.Future[Placement] = loop.create_future()
            fate = self.verdict(record)
            if fate == "hold":
                self.held.append((record, future))
            elif fate is None:
                self._land(record, future)
            elif fate == "unanswered":
                self.landed.append(record)
                future.set_exception(aiokafka.errors.RequestTimedOutError())
            else:
                future.set_exception(ERRORS[fate]())
            futures.append(future)
        return futures

    def release(self) -> None:
        """Kafka comes back: what it held lands, in the order it was sent."""
        held, self.held = self.held, []
        for record, future in held:
            self._land(record, future)

    def _land(self, record: Record, future: asyncio.Future[Placement]) -> None:
        self.landed.append(record)
        future.set_result(Placement(record.topic, 0, len(self.landed) - 1))

    async def publish(self, records: Sequence[Record], ack_timeout: float) -> list[Placement]:
        return await wait_all(self.send(records), ack_timeout)

    async def check_connection(self, within: float) -> bool:
        return True

    async def find(self, records: Sequence[Record], since_ms: int, within: float) -> list[bool]:
        self.lookups.append((list(records), since_ms))
        if self.lookups_fail:
            raise KafkaUnavailable("timeout")
        return [record in self.landed for record in records]

    async def renew(self) -> None:
        self.renewals += 1


def rec(generation: str, state: str, topic: str = "t.lifecycle") -> Record:
    return Record(topic, generation.encode(), f"{generation}:{state}".encode(), [])


def states(records: Sequence[Record], generation: str) -> list[str]:
    return [r.value.decode().split(":")[1] for r in records if r.key == generation.encode()]


class Rig:
    def __init__(self, spool: Spool, lanes: Lanes, publisher: ScriptedPublisher, metrics: Metrics):
        self.spool, self.lanes, self.publisher, self.metrics = spool, lanes, publisher, metrics

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await spool.open()
    publisher = ScriptedPublisher()
    lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics, stall_seconds=0.3)
    lanes.open()
    drainer = asyncio.create_task(lanes.run())
    try:
        yield Rig(spool, lanes, publisher, metrics)
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        await spool.close()


async def test_a_later_callback_waits_behind_a_slowly_spooled_earlier_one(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 1: the spool's commit window. `queued` times out and is being spooled
    (a slow fsync) when `dreaming` of the same generation arrives and Kafka is back."""
    insert = rig.spool._insert_sync

    def slow_insert(*args: object) -> int:
        time.sleep(0.3)
        return insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.spool, "_insert_sync", slow_insert)
    rig.publisher.verdict = lambda r: "hold"
    queued = asyncio.create_task(rig.lanes.write([rec("g", "queued")], ack_timeout=0.1))
    await asyncio.sleep(0.15)  # queued timed out; its row is being written
    rig.publisher.verdict = lambda r: None
    dreaming = await rig.lanes.write([rec("g", "dreaming")], ack_timeout=1.0)
    assert dreaming.spooled  # behind queued, not around it
    assert (await queued).spooled
    rig.publisher.release()  # queued's own send lands late
    await wait_until(lambda: rig.spool.records == 0, what="spool drained")
    assert states(rig.publisher.landed, "g") == ["queued", "dreaming"]
    assert states(rig.publisher.sent, "g") == ["queued", "dreaming"]  # nothing sent twice


async def test_a_late_acknowledgement_deletes_the_row_and_nothing_is_sent_again(
    rig: Rig,
) -> None:
    """Finding 4: a send that outlives the ack timeout is spooled, not sent twice."""
    rig.publisher.verdict = lambda r: "hold"
    written = await rig.lanes.write([rec("g", "queued"), rec("g", "queued", "t.queued")], 0.05)
    assert written.spooled
    assert rig.spool.records == 2
    for _ in range(3):  # the drainer runs meanwhile: it must leave the pending sends alone
        await rig.lanes.step()
    rig.publisher.release()
    await wait_until(lambda: rig.spool.records == 0, what="late acks deleted the rows")
    assert len(rig.publisher.sent) == 2
    assert rig.sample("luma_bridge_late_acknowledgements_total") == 2


async def test_a_send_that_landed_without_an_answer_is_found_not_sent_again(
    rig: Rig,
) -> None:
    """A produce request whose answer never came (the broker froze past the request
    timeout) was appended when the broker resumed: the drainer looks the row up in Kafka
    and removes it instead of writing a second copy; the rows behind it follow in order."""
    rig.publisher.verdict = lambda r: "unanswered" if r.value == b"g:queued" else "hold"
    before = time.time_ns() // 1_000_000
    assert (await rig.lanes.write([rec("g", "queued")], 0.5)).spooled
    assert (await rig.lanes.write([rec("g", "dreaming")], 0.05)).spooled
    rig.publisher.verdict = lambda r: None
    rig.publisher.release()
    await wait_until(lambda: rig.spool.records == 0, what="spool drained")
    assert states(rig.publisher.landed, "g") == ["queued", "dreaming"]
    assert [r.value for r in rig.publisher.sent] == [b"g:queued", b"g:dreaming"]
    [(looked_up, since_ms)] = rig.publisher.lookups
    assert looked_up == [rec("g", "queued")]
    assert since_ms <= before  # from before the failed send, whatever the clocks say
    assert rig.sample("luma_bridge_resend_lookups_total", outcome="found") == 1


async def test_a_send_that_did_not_land_is_sent_again_after_the_lookup(rig: Rig) -> None:
    rig.publisher.verdict = lambda r: "RequestTimedOutError"
    assert (await rig.lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: bool(rig.publisher.lookups), what="the failed send looked up")
    rig.publisher.verdict = lambda r: None
    await wait_until(lambda: rig.spool.records == 0, timeout=10, what="spool drained")
    assert states(rig.publisher.landed, "g") == ["queued"]
    assert rig.sample("luma_bridge_resend_lookups_total", outcome="absent") >= 1
    assert rig.sample("luma_bridge_resend_lookups_total", outcome="found") == 0


async def test_a_send_never_handed_to_kafka_is_not_looked_up(rig: Rig) -> None:
    """Not connected: the record cannot have landed, so no lookup is spent on it."""
    rig.publisher.verdict = lambda r: "NotConnected"
    assert (await rig.lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(
        lambda: rig.sample("luma_bridge_spool_send_failures_total", kind="retry") >= 1,
        what="the drainer's send failed too",
    )
    rig.publisher.verdict = lambda r: None
    await wait_until(lambda: rig.spool.records == 0, timeout=10, what="spool drained")
    assert rig.publisher.lookups == []


async def test_when_the_lookup_fails_the_row_is_sent_again_rather_than_held(rig: Rig) -> None:
    """No read access, or Kafka still away: never wedge; send, and count the failure."""
    rig.publisher.lookups_fail = True
    rig.publisher.verdict = lambda r: "RequestTimedOutError"
    assert (await rig.lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: bool(rig.publisher.lookups), what="a lookup tried")
    rig.publisher.verdict = lambda r: None
    await wait_until(lambda: rig.spool.records == 0, timeout=10, what="spool drained")
    assert states(rig.publisher.landed, "g") == ["queued"]
    assert rig.sample("luma_bridge_resend_lookups_total", outcome="failed") >= 1


async def test_many_generations_in_flight_keep_their_own_order(rig: Rig) -> None:
    """States of one generation delivered independently, through an outage and back."""
    rig.publisher.verdict = lambda r: "hold"
    writes = []
    for n in range(20):
        for state in ("queued", "dreaming", "completed"):
            writes.append(asyncio.create_task(rig.lanes.write([rec(f"g{n}", state)], 0.05)))
            await asyncio.sleep(0.001)
    await asyncio.gather(*writes)
    rig.publisher.verdict = lambda r: None
    rig.publisher.release()
    await wait_until(lambda: rig.spool.records == 0, what="spool drained")
    for n in range(20):
        assert states(rig.publisher.landed, f"g{n}") == ["queued", "dreaming", "completed"]
    assert len(rig.publisher.landed) == 60


async def test_quarantine_at_the_head_of_the_spool(tmp_path: Path) -> None:
    """Finding 2: one record Kafka refuses for good (too large) no longer stops the rest,
    and nothing Kafka took is sent again."""
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await spool.open()
    first = spool.next_seqs(3)
    await spool.append([(first + n, rec(g, "queued")) for n, g in enumerate(("big", "g1", "g2"))])
    publisher = ScriptedPublisher()
    publisher.verdict = lambda r: "RecordTooLargeError" if r.key == b"big" else None
    lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics, dead_letter_topic="t.dl")
    lanes.open()
    for _ in range(5):
        await lanes.step()
        await asyncio.sleep(0)
    assert spool.records == 0
    assert spool.quarantined == 1
    assert [r.key for r in publisher.landed if r.topic != "t.dl"] == [b"g1", b"g2"]
    assert len([r for r in publisher.sent if r.topic != "t.dl"]) == 3  # each once
    # A copy on the dead-letter topic, as every dead letter: no key, why, and when it came.
    [letter] = [r for r in publisher.landed if r.topic == "t.dl"]
    assert (letter.key, letter.value) == (None, b"big:queued")
    assert dict(letter.headers)["luma-error"] == (
        b"Kafka refused the record for good on t.lifecycle: RecordTooLargeError"
    )
    assert (
        metrics.registry.get_sample_value(
            "luma_bridge_deadletters_total", {"reason": "kafka_refused"}
        )
        == 1
    )
    reason = {"reason": "RecordTooLargeError"}
    assert (
        metrics.registry.get_sample_value("luma_bridge_spool_quarantined_records_total", reason)
        == 1
    )
    assert metrics.registry.get_sample_value("luma_bridge_spool_quarantine_records") == 1
    await spool.close()


async def test_a_dead_letter_topic_that_refuses_the_copy_leaves_it_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path, max_bytes=8 << 20, metrics=metrics)
    await spool.open()
    await spool.append([(spool.next_seqs(1), rec("big", "queued"))])
    publisher = ScriptedPublisher()
    publisher.verdict = lambda r: "RecordTooLargeError"  # the dead-letter topic too
    lanes = Lanes(publisher=publisher, spool=spool, metrics=metrics, dead_letter_topic="t.dl")
    lanes.open()
    for _ in range(3):
        await lanes.step()
        await asyncio.sleep(0)
    assert spool.quarantined == 1
    await wait_until(
        lambda: any("quarantine only" in r.getMessage() for r in caplog.records),
        what="the refused copy logged",
    )
    assert [r.topic for r in publisher.sent] == ["t.lifecycle", "t.dl"]
    await spool.close()


async def test_a_refused_topic_keeps_its_rows_and_stalls(rig: Rig) -> None:
    """An ACL change: nothing is quarantined, the rows wait, the spool reports a stall."""
    rig.publisher.verdict = lambda r: "TopicAuthorizationFailedError"
    written = await rig.lanes.write([rec("g", "queued")], 0.5)
    assert written.spooled
    await wait_until(rig.lanes.stalled, timeout=5, what="spool reported stalled")
    assert rig.spool.records == 1
    assert rig.spool.quarantined == 0
    assert rig.sample("luma_bridge_spool_send_failures_total", kind="topic") >= 1
    rig.publisher.verdict = lambda r: None  # the operator fixed the ACL
    await wait_until(lambda: rig.spool.records == 0, timeout=10, what="drained after the fix")
    assert not rig.lanes.stalled()


async def test_an_unusable_producer_is_renewed(rig: Rig) -> None:
    """aiokafka's idempotent producer stuck on OutOfOrderSequenceNumber is replaced."""
    rig.publisher.verdict = lambda r: "OutOfOrderSequenceNumber"
    assert (await rig.lanes.write([rec("g", "queued")], 0.5)).spooled
    await wait_until(lambda: rig.publisher.renewals >= 1, what="producer renewed")
    rig.publisher.verdict = lambda r: None
    await wait_until(lambda: rig.spool.records == 0, timeout=10, what="drained after renewal")
    assert states(rig.publisher.landed, "g") == ["queued"]


async def test_a_record_too_large_on_the_direct_path_is_refused(rig: Rig) -> None:
    rig.publisher.verdict = lambda r: "MessageSizeTooLargeError"
    with pytest.raises(Refused):
        await rig.lanes.write([rec("g", "queued")], 0.5)
    assert rig.spool.records == 0
    rig.publisher.verdict = lambda r: None
    assert not (await rig.lanes.write([rec("g", "dreaming")], 0.5)).spooled  # lane free


async def test_without_a_spool_a_busy_lane_waits_then_answers_unavailable() -> None:
    metrics = Metrics(CollectorRegistry())
    publisher = ScriptedPublisher()
    lanes = Lanes(publisher=publisher, spool=None, metrics=metrics)
    publisher.verdict = lambda r: "hold"
    with pytest.raises(Unavailable):
        await lanes.write([rec("g", "queued")], 0.05)
    publisher.verdict = lambda r: None
    later = asyncio.create_task(lanes.write([rec("g", "dreaming")], 2.0))
    await asyncio.sleep(0.05)
    assert not later.done()  # queued's send is still pending: dreaming may not pass it
    publisher.release()
    assert not (await later).spooled
    assert states(publisher.landed, "g") == ["queued", "dreaming"]


async def test_a_background_task_that_fails_is_restarted_and_counted() -> None:
    """Finding 3: an unexpected error (a full disk) no longer ends the drainer for good."""
    metrics = Metrics(CollectorRegistry())
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise OSError(28, "database or disk is full")

    await asyncio.wait_for(supervise("drainer", flaky, metrics), timeout=5)
    assert runs == 2
    assert (
        metrics.registry.get_sample_value("luma_bridge_task_restarts_total", {"task": "drainer"})
        == 1
    )


async def test_while_sends_are_pending_past_the_timeout_callbacks_spool_sooner(
    rig: Rig,
) -> None:
    rig.publisher.verdict = lambda r: "hold"  # Kafka away
    assert (await rig.lanes.write([rec("g1", "queued")], ack_timeout=0.3)).spooled
    started = time.monotonic()
    assert (await rig.lanes.write([rec("g2", "queued")], ack_timeout=3.0)).spooled
    assert time.monotonic() - started < 1.0  # not the whole 3 s: Kafka is known to be away
    rig.publisher.release()
    await wait_until(lambda: rig.spool.records == 0, what="late acks")
    assert len(rig.publisher.sent) == 2
