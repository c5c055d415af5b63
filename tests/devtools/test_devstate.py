"""The state file through which `dev` points the other commands at its broker and URL."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.devtools.devstate import (
    DevState,
    read_dev_state,
    remove_dev_state,
    settings_with_dev_broker,
    state_file,
    write_dev_state,
)


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.delenv("LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("LUMA_BRIDGE_TOPIC_PREFIX", raising=False)
    return tmp_path


def running(**changes: object) -> DevState:
    values: dict[str, object] = {
        "bootstrap_servers": "127.0.0.1:39092",
        "callback_url": "http://127.0.0.1:8080/luma/callback/tok",
        "topic_prefix": "dev.prefix",
        "pid": os.getpid(),
        **changes,
    }
    return DevState(**values)  # type: ignore[arg-type]


def test_the_file_lives_under_xdg_state_home_readable_by_its_owner_only(
    state_home: Path,
) -> None:
    path = write_dev_state(running())
    assert path == state_file() == state_home / "luma-kafka-bridge" / "dev.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_dev_state() == running()


def test_a_dead_dev_is_ignored_and_removal_spares_a_newer_dev(state_home: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    write_dev_state(running(pid=int(finished.stdout)))
    assert read_dev_state() is None
    write_dev_state(running())
    remove_dev_state(pid=int(finished.stdout))
    assert read_dev_state() == running()
    remove_dev_state(pid=os.getpid())
    assert not state_file().exists()


def test_commands_use_dev_only_when_nothing_names_a_broker(
    state_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings_with_dev_broker({}).kafka_bootstrap_servers == "localhost:9092"
    write_dev_state(running())
    note = io.StringIO()
    found = settings_with_dev_broker({}, note=note)
    assert (found.kafka_bootstrap_servers, found.topic_prefix) == ("127.0.0.1:39092", "dev.prefix")
    assert "127.0.0.1:39092" in note.getvalue()
    flagged = settings_with_dev_broker({"kafka_bootstrap_servers": "kafka:9092"})
    assert flagged.kafka_bootstrap_servers == "kafka:9092"
    monkeypatch.setenv("LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS", "env-kafka:9092")
    monkeypatch.setenv("LUMA_BRIDGE_TOPIC_PREFIX", "mine")
    from_env = settings_with_dev_broker({})
    assert (from_env.kafka_bootstrap_servers, from_env.topic_prefix) == ("env-kafka:9092", "mine")


def test_a_broken_file_is_ignored(state_home: Path) -> None:
    state_file().parent.mkdir(parents=True)
    state_file().write_text("{not json")
    assert read_dev_state() is None
