"""The spool on its own: durable across reopen, FIFO, bounded, grouped commits."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.delivery.publisher import Record
from bridge.delivery.spool import Spool, SpoolDrainer, SpoolFull, record_size
from bridge.ops.metrics import Metrics
from tests.helpers import MemoryPublisher, wait_until


def record(n: int, size: int = 100) -> Record:
    return Record("t.queued", f"g{n}".encode(), b"x" * size, [("luma-state", b"queued")])


def keys_on_disk(directory: Path) -> list[bytes]:
    """The keys of the rows the spool's database file holds, oldest first, read apart from
    the spool (a second connection sees only what was committed)."""
    (database,) = directory.glob("*.sqlite3")
    with closing(sqlite3.connect(database)) as db:
        return [key for (key,) in db.execute("SELECT key FROM spool ORDER BY seq")]


async def open_spool(path: Path, max_bytes: int = 1 << 20) -> tuple[Spool, Metrics]:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(path, max_bytes=max_bytes, metrics=metrics)
    await spool.open()
    return spool, metrics


async def test_records_survive_a_reopen_in_arrival_order(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    await asyncio.gather(*(spool.append([record(n)]) for n in range(50)))
    assert keys_on_disk(tmp_path) == [f"g{n}".encode() for n in range(50)]
    await spool.close()

    reopened, metrics = await open_spool(tmp_path)
    assert reopened.records == 50
    assert metrics.registry.get_sample_value("luma_bridge_spool_records") == 50
    batch = await reopened.oldest(1000)
    assert batch is not None
    assert [r.key for r in batch.records] == [f"g{n}".encode() for n in range(50)]
    assert batch.records[0].headers == [("luma-state", b"queued")]
    await reopened.close()


async def test_concurrent_appends_share_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, metrics = await open_spool(tmp_path)
    commits = 0
    insert = spool._insert_sync

    def counting_insert(*args: object) -> None:
        nonlocal commits
        commits += 1
        insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(spool, "_insert_sync", counting_insert)
    await asyncio.gather(*(spool.append([record(n)]) for n in range(200)))
    assert spool.records == 200
    assert len(keys_on_disk(tmp_path)) == 200
    assert commits < 200
    assert metrics.registry.get_sample_value("luma_bridge_spooled_total") == 200
    await spool.close()


async def test_a_full_spool_refuses_more(tmp_path: Path) -> None:
    one = record(0, size=100_000)
    spool, _ = await open_spool(tmp_path, max_bytes=1 << 20)
    for _ in range((1 << 20) // record_size(one)):
        await spool.append([one])
    with pytest.raises(SpoolFull):
        await spool.append([one])
    assert spool.records == (1 << 20) // record_size(one)
    assert len(keys_on_disk(tmp_path)) == spool.records
    await spool.close()


async def test_the_drainer_removes_only_what_kafka_acknowledged(tmp_path: Path) -> None:
    spool, metrics = await open_spool(tmp_path)
    for n in range(10):
        await spool.append([record(n)])
    publisher = MemoryPublisher()
    drainer = SpoolDrainer(spool, publisher)
    publisher.failing = "KafkaTimeoutError"
    assert not await drainer.drain_once()
    assert spool.records == 10
    assert len(keys_on_disk(tmp_path)) == 10
    publisher.failing = None
    assert await drainer.drain_once()
    assert spool.records == 0
    assert keys_on_disk(tmp_path) == []
    assert [r.key for r in publisher.records] == [f"g{n}".encode() for n in range(10)]
    assert metrics.registry.get_sample_value("luma_bridge_spool_drained_total") == 10
    assert spool.oldest_age() == 0.0
    await spool.close()


async def test_only_the_acknowledged_batch_is_removed_from_disk(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    for n in range(SpoolDrainer.BATCH + 3):
        await spool.append([record(n, size=10)])
    publisher = MemoryPublisher()
    assert await SpoolDrainer(spool, publisher).drain_once()
    assert keys_on_disk(tmp_path) == [
        f"g{n}".encode() for n in range(SpoolDrainer.BATCH, SpoolDrainer.BATCH + 3)
    ]
    assert spool.records == 3
    assert spool.size == sum(
        record_size(record(n, size=10)) for n in range(SpoolDrainer.BATCH, SpoolDrainer.BATCH + 3)
    )
    await spool.close()


async def test_the_oldest_age_counts_from_the_first_spooled_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, _ = await open_spool(tmp_path, max_bytes=1 << 20)
    assert spool.oldest_age() == 0.0
    assert spool.has_room()
    await spool.append([record(0)])
    spooled_at = time.time()
    monkeypatch.setattr(time, "time", lambda: spooled_at + 100)
    assert 99 < spool.oldest_age() <= 101
    monkeypatch.setattr(time, "time", lambda: spooled_at - 100)  # a clock stepped back
    assert spool.oldest_age() == 0.0
    monkeypatch.undo()
    await spool.close()


async def test_has_room_until_the_bound_is_reached(tmp_path: Path) -> None:
    one = record(0, size=100_000)
    spool, _ = await open_spool(tmp_path, max_bytes=2 * record_size(one))
    await spool.append([one])
    assert spool.has_room()
    await spool.append([one])
    assert not spool.has_room()
    await spool.close()


async def test_the_running_drainer_sends_what_is_spooled_once_kafka_takes_it(
    tmp_path: Path,
) -> None:
    spool, _ = await open_spool(tmp_path)
    publisher = MemoryPublisher()
    publisher.failing = "KafkaTimeoutError"
    drainer = asyncio.create_task(SpoolDrainer(spool, publisher).run())
    try:
        for n in range(3):
            await spool.append([record(n)])
        await wait_until(lambda: publisher.calls >= 2, what="the drainer to try (and retry)")
        assert spool.records == 3
        publisher.failing = None
        await wait_until(lambda: spool.records == 0, what="the spool drained")
        assert [r.key for r in publisher.records] == [b"g0", b"g1", b"g2"]
        await wait_until(lambda: not spool.wakeup.is_set(), what="the drainer to go idle")
        await spool.append([record(3)])  # wakes it again
        await wait_until(lambda: spool.records == 0, what="the new record drained")
    finally:
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer
    await spool.close()


async def test_drain_until_sends_what_kafka_takes_before_the_deadline(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    for n in range(SpoolDrainer.BATCH + 1):
        await spool.append([record(n, size=10)])
    publisher = MemoryPublisher()
    drainer = SpoolDrainer(spool, publisher)
    await drainer.drain_until(time.monotonic() + 10)
    assert spool.records == 0
    assert len(publisher.records) == SpoolDrainer.BATCH + 1
    await spool.append([record(0)])
    publisher.failing = "KafkaTimeoutError"
    started = time.monotonic()
    await drainer.drain_until(time.monotonic() + 0.5)
    assert 0.4 < time.monotonic() - started < 3
    assert spool.records == 1
    tried = publisher.calls
    await drainer.drain_until(time.monotonic() - 1)  # past the deadline: nothing tried
    assert publisher.calls == tried
    await spool.close()
