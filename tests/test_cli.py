"""The command line: each command's help lists its own options, each with its default."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bridge.cli import COMMAND_SETTINGS, SETTING_GROUPS, build_parser, ungrouped_settings
from bridge.settings import Settings, flag_name

SERVER_ONLY = ("--port", "--auth-tokens", "--max-body-bytes", "--spool-dir", "--drain-delay")


def help_text(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "100", "PATH": ""},
    )
    return result.stdout


def option_entries(text: str) -> dict[str, str]:
    """Each `--flag` of the help, with its whole help text (wrapped lines joined)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if match := re.match(r"^  (--[a-z0-9-]+)", line):
            current = match[1]
            entries[current] = line
        elif current and line.startswith(" " * 10):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", [("tail",), ("deadletter", "replay")])
def test_consumer_side_commands_list_no_server_flags(command: tuple[str, ...]) -> None:
    text = help_text(*command)
    options = option_entries(text)
    for flag in SERVER_ONLY:
        assert flag not in options, f"{flag} in `{' '.join(command)} --help`"
    assert "--kafka-bootstrap-servers" in options
    assert len(options) < 30, sorted(options)


@pytest.mark.parametrize(
    "command", [("serve",), ("dev",), ("tail",), ("deadletter", "replay"), ("topics", "create")]
)
def test_every_setting_flag_shows_its_default(command: tuple[str, ...]) -> None:
    options = option_entries(help_text(*command))
    settings_flags = {flag_name(name) for name in Settings.model_fields}
    shown = [flag for flag in options if flag in settings_flags]
    assert shown
    for flag in shown:
        assert "(default: " in options[flag], options[flag]
    assert "(default: 8080)" in options.get("--port", "(default: 8080)")


def test_tail_and_simulate_options_show_their_defaults() -> None:
    tail = option_entries(help_text("tail"))
    assert "default: only events written from now on" in tail["--from-beginning"]
    assert "default: never" in tail["--max-events"]
    simulate = option_entries(help_text("simulate"))
    assert "(default: 12)" in simulate["--count"]
    assert "(default: 0.0)" in simulate["--invalid-ratio"]
    assert "running `dev`" in simulate["--url"]


def test_serve_lists_every_setting_but_topic_creation_and_dev_has_no_broker_flag() -> None:
    serve = option_entries(help_text("serve"))
    not_served = {
        name for group in ("topic creation", "reconciliation") for name in SETTING_GROUPS[group]
    }
    assert {flag_name(name) for name in Settings.model_fields if name not in not_served} <= set(
        serve
    )
    # The key and Luma's URL serve callback verification; the reconciler's own settings do not.
    assert {"--luma-api-key", "--verify", "--verify-timeout"} <= set(serve)
    assert "--luma-api-rate-limit" not in serve
    assert "--topic-partitions" not in serve
    dev = option_entries(help_text("dev"))
    assert "--kafka-bootstrap-servers" not in dev
    assert "--broker-port" in dev


def test_a_setting_in_no_group_still_reaches_serve_and_dev() -> None:
    """Settings added later appear under "more settings" rather than nowhere."""
    grouped = {name for names in SETTING_GROUPS.values() for name in names}
    assert grouped <= set(Settings.model_fields), grouped - set(Settings.model_fields)
    assert "more settings" in COMMAND_SETTINGS["serve"]
    parser = build_parser()
    for name in ungrouped_settings():
        args = parser.parse_args(["serve", flag_name(name), "x"])
        assert getattr(args, f"setting_{name}") == "x"
