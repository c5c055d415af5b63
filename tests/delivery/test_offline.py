"""`spool inspect` and `spool drain` on a spool left behind, through the real CLI and a real
broker; the spool is one the first release wrote (schema 1), so this is the upgrade path too."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.delivery.topics import create_topics
from bridge.settings import load_settings
from tests.helpers import read_topic

FIXTURE = Path(__file__).parent / "fixtures" / "spool-v1.sqlite3"


@pytest.fixture
def left_behind(tmp_path: Path) -> Path:
    shutil.copy(FIXTURE, tmp_path / "spool.sqlite3")
    return tmp_path


def test_inspect_shows_what_a_spool_holds(
    left_behind: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["spool", "inspect", "--spool-dir", str(left_behind)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["records"] == 6
    assert described["topics"]["v1.lifecycle"]["records"] == 3
    assert described["quarantined"] == 0


def test_inspect_without_a_spool_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["spool", "inspect", "--spool-dir", str(tmp_path)]) == 1
    assert "no spool in" in capsys.readouterr().err


@pytest.mark.integration
def test_drain_sends_a_left_behind_spool_in_order_and_empties_it(
    left_behind: Path, kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix="v1",
        topic_replication_factor=1,
        topic_partitions=1,
    )
    asyncio.run(create_topics(settings))
    code = main(
        [
            "spool",
            "drain",
            "--spool-dir",
            str(left_behind),
            "--kafka-bootstrap-servers",
            kafka_bootstrap,
            "--kafka-enable-idempotence",
            "false",
            "--timeout",
            "60",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert summary["records_before"] == 6
    assert summary["records_left"] == 0
    records = asyncio.run(read_topic(kafka_bootstrap, "v1.lifecycle", expected=3))
    keys = [r.key for r in records]
    assert keys[-3:] == [b"g0", b"g1", b"g2"]
    assert main(["spool", "inspect", "--spool-dir", str(left_behind)]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 0
