"""How `luma-kafka-bridge dev` tells the other commands where its broker and URL are.

`dev` writes a small JSON file while it runs, `$XDG_STATE_HOME/luma-kafka-bridge/dev.json`
(`~/.local/state/luma-kafka-bridge/dev.json` by default, readable only by its owner: the
callback URL holds dev's token), and removes it when it stops. `tail`, `deadletter replay`,
`simulate` and `examples/downstream_service.py` read it when nothing else names a broker
(no `--kafka-bootstrap-servers`, no `LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS`) or a URL, and say
on stderr that they did. A file whose `dev` is no longer running (killed before it could
clean up) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from bridge.settings import DevStateSettings, Settings, env_name, load_settings

STATE_DIR_NAME = "luma-kafka-bridge"
STATE_FILE_NAME = "dev.json"


@dataclass(frozen=True, slots=True)
class DevState:
    """What a running `dev` offers the other commands."""

    bootstrap_servers: str
    callback_url: str
    topic_prefix: str
    pid: int


def state_file() -> Path:
    """Where `dev` writes its state: under `XDG_STATE_HOME`, else `~/.local/state`."""
    base = DevStateSettings().xdg_state_home or Path.home() / ".local" / "state"
    return base / STATE_DIR_NAME / STATE_FILE_NAME


def write_dev_state(state: DevState, path: Path | None = None) -> Path:
    """Write `state` atomically, readable by its owner only; returns the file's path."""
    path = path or state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".dev-", suffix=".json")
    try:
        with os.fdopen(descriptor, "w") as out:
            json.dump(asdict(state), out)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def remove_dev_state(pid: int, path: Path | None = None) -> None:
    """Remove the file if it is still this `dev`'s (a newer `dev` may have replaced it)."""
    path = path or state_file()
    state = _read(path)
    if state is not None and state.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_dev_state(path: Path | None = None) -> DevState | None:
    """The state of a `dev` that is running now, or None."""
    state = _read(path or state_file())
    if state is None or not _is_running(state.pid):
        return None
    return state


def _read(path: Path) -> DevState | None:
    try:
        document: Any = json.loads(path.read_text())
        return DevState(
            bootstrap_servers=str(document["bootstrap_servers"]),
            callback_url=str(document["callback_url"]),
            topic_prefix=str(document["topic_prefix"]),
            pid=int(document["pid"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def settings_with_dev_broker(
    overrides: dict[str, Any], *, note: TextIO | None = None, path: Path | None = None
) -> Settings:
    """Settings from the environment and `overrides`, pointed at a running `dev`'s broker
    (and topic prefix) when neither names a broker. Says so on `note`.

    Raises `SettingsError` for a bad setting, like `load_settings`.
    """
    settings = load_settings(**overrides)
    if "kafka_bootstrap_servers" in settings.model_fields_set:
        return settings
    state = read_dev_state(path)
    if state is None:
        return settings
    found = {"kafka_bootstrap_servers": state.bootstrap_servers}
    if "topic_prefix" not in settings.model_fields_set:
        found["topic_prefix"] = state.topic_prefix
    if note is not None:
        print(
            f"using the broker of `luma-kafka-bridge dev` (pid {state.pid}), "
            f"{state.bootstrap_servers}, from {path or state_file()}; set "
            f"{env_name('kafka_bootstrap_servers')} or --kafka-bootstrap-servers for another",
            file=note,
        )
    return load_settings(**{**overrides, **found})
