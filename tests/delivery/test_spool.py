"""The spool on its own: durable across reopen, ordered by arrival, bounded on disk, upgradable."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.delivery.publisher import Record
from bridge.delivery.spool import SCHEMA_VERSION, Spool, SpoolFull
from bridge.ops.metrics import Metrics

FIXTURES = Path(__file__).parent / "fixtures"


def record(n: int, size: int = 100) -> Record:
    return Record("t.queued", f"g{n}".encode(), b"x" * size, [("luma-state", b"queued")])


async def open_spool(path: Path, max_bytes: int = 1 << 20) -> tuple[Spool, Metrics]:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(path, max_bytes=max_bytes, metrics=metrics)
    await spool.open()
    return spool, metrics


async def append(spool: Spool, *records: Record) -> None:
    first = spool.next_seqs(len(records))
    await spool.append([(first + n, r) for n, r in enumerate(records)])


def disk_usage(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir())


async def test_records_survive_a_reopen_in_arrival_order(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    await asyncio.gather(*(append(spool, record(n)) for n in range(50)))
    await spool.close()

    reopened, metrics = await open_spool(tmp_path)
    assert reopened.records == 50
    assert metrics.registry.get_sample_value("luma_bridge_spool_records") == 50
    rows = await reopened.oldest(0, 1000)
    assert [row.record.key for row in rows] == [f"g{n}".encode() for n in range(50)]
    assert rows[0].record.headers == [("luma-state", b"queued")]
    assert reopened.next_seqs(1) == 51
    await reopened.close()


async def test_a_row_spooled_late_sorts_by_its_arrival(tmp_path: Path) -> None:
    spool, _ = await open_spool(tmp_path)
    early = spool.next_seqs(1)
    await append(spool, record(2))
    await spool.append([(early, record(1))])
    assert [row.record.key for row in await spool.oldest()] == [b"g1", b"g2"]
    await spool.close()


async def test_concurrent_appends_share_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, metrics = await open_spool(tmp_path)
    commits = 0
    insert = spool._insert_sync

    def counting_insert(*args: object) -> int:
        nonlocal commits
        commits += 1
        return insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(spool, "_insert_sync", counting_insert)
    await asyncio.gather(*(append(spool, record(n)) for n in range(200)))
    assert spool.records == 200
    assert commits < 200
    assert metrics.registry.get_sample_value("luma_bridge_spooled_records_total") == 200
    await spool.close()


async def test_the_bound_is_disk_bytes_and_a_drained_spool_is_small_again(
    tmp_path: Path,
) -> None:
    max_bytes = 2 << 20
    spool, metrics = await open_spool(tmp_path, max_bytes=max_bytes)
    appended = 0
    full = False
    while not full:
        try:
            await append(spool, record(appended, size=20_000))
            appended += 1
        except SpoolFull:
            full = True
    on_disk = disk_usage(tmp_path)
    assert spool.disk_bytes <= max_bytes
    assert on_disk <= max_bytes, f"{on_disk} bytes on disk for a {max_bytes}-byte bound"
    assert appended * 20_000 > max_bytes // 3  # the bound is not wildly pessimistic
    await spool.remove(row.seq for row in await spool.oldest(0, 10_000))
    assert spool.records == 0
    assert spool.disk_bytes < max_bytes // 4, spool.disk_bytes
    assert spool.has_room()
    assert metrics.registry.get_sample_value("luma_bridge_spool_bytes") == spool.disk_bytes
    await append(spool, record(1, size=20_000))  # room again
    await spool.close()


async def test_quarantine_moves_a_row_aside(tmp_path: Path) -> None:
    spool, metrics = await open_spool(tmp_path)
    await append(spool, record(1), record(2))
    first = (await spool.oldest())[0]
    await spool.quarantine(first.seq, "RecordTooLargeError")
    assert [row.record.key for row in await spool.oldest()] == [b"g2"]
    assert spool.quarantined == 1
    described = await spool.describe()
    assert described["quarantine"][0]["reason"] == "RecordTooLargeError"
    assert (
        metrics.registry.get_sample_value(
            "luma_bridge_spool_quarantined_records_total", {"reason": "RecordTooLargeError"}
        )
        == 1
    )
    await spool.close()


async def test_a_spool_written_by_the_first_release_opens_and_upgrades(tmp_path: Path) -> None:
    # Made by the code on main before this schema (see fixtures/README.md).
    shutil.copy(FIXTURES / "spool-v1.sqlite3", tmp_path / "spool.sqlite3")
    spool, _ = await open_spool(tmp_path)
    rows = await spool.oldest(0, 100)
    assert spool.records == len(rows) == 6
    assert {row.record.topic for row in rows} == {"v1.queued", "v1.lifecycle"}
    assert spool.next_seqs(1) == rows[-1].seq + 1
    await spool.close()
    version = sqlite3.connect(tmp_path / "spool.sqlite3").execute("PRAGMA user_version")
    assert version.fetchone()[0] == SCHEMA_VERSION
