"""`luma-kafka-bridge dev`, as a new user runs it: the printed URL accepts the seed example."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from bridge.devtools.embedded import EmbeddedBrokerError, find_broker_binary
from tests.conftest import unavailable
from tests.helpers import SEED_COMPLETED_VIDEO, read_topic

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def read_banner(stdout: asyncio.StreamReader) -> dict[str, str]:
    found: dict[str, str] = {}
    async with asyncio.timeout(60):
        while "url" not in found or "broker" not in found:
            line = (await stdout.readline()).decode()
            if not line:
                raise AssertionError("dev exited before printing its banner")
            if match := re.search(r"Embedded Kafka broker:\s+(\S+)", line):
                found["broker"] = match[1]
            if match := re.search(r"Callback URL for Luma:\s+(\S+)", line):
                found["url"] = match[1]
    return found


async def test_dev_prints_a_url_whose_callbacks_land_on_their_topic(tmp_path: Path) -> None:
    try:
        find_broker_binary()
    except EmbeddedBrokerError as exc:
        unavailable(str(exc))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "dev",
        "--port",
        "0",
        "--admin-port",
        "0",
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        banner = await read_banner(process.stdout)
        async with (
            aiohttp.ClientSession() as http,
            http.post(banner["url"], json=SEED_COMPLETED_VIDEO) as response,
        ):
            assert response.status == 200, await response.text()
        (record,) = await read_topic(banner["broker"], "luma.generation.completed", expected=1)
        assert record.key == b"d1ad97c4-9d8f-4e3a-9c2e-3b8c0b9b1e2a"
        assert json.loads(record.value) == SEED_COMPLETED_VIDEO
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_whole_banner(stdout: asyncio.StreamReader) -> list[str]:
    lines: list[str] = []
    async with asyncio.timeout(60):
        while not lines or not lines[-1].startswith("Press Ctrl-C"):
            line = (await stdout.readline()).decode()
            if not line:
                raise AssertionError(f"dev exited before printing its banner: {lines}")
            lines.append(line.rstrip("\n"))
    return lines


def banner_commands(lines: list[str]) -> dict[str, str]:
    """Each command of the banner by its label, continuation lines joined."""
    commands: dict[str, str] = {}
    label = None
    for line in lines:
        if line.startswith("  ") and not line.startswith("    ") and line.endswith(":"):
            label = line.strip().rstrip(":")
        elif label and line.startswith("    "):
            text = line.strip()
            previous = commands.get(label, "")
            commands[label] = (previous[:-1] + " " + text) if previous.endswith("\\") else text
        else:
            label = None
    return commands


def examples_readme_commands() -> list[str]:
    """The commands of examples/README.md's block, comments left out; they need `.venv`."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        unavailable("examples/README.md's commands need the repository's .venv")
    readme = (ROOT / "examples" / "README.md").read_text()
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines()]


def clean_shell_env(state_home: Path) -> dict[str, str]:
    """A new user's fresh shell: no venv on PATH, nothing of ours in the environment."""
    return {"HOME": str(state_home), "XDG_STATE_HOME": str(state_home), "PATH": "/usr/bin:/bin"}


async def run_in_fresh_shell(
    command: str, env: dict[str, str], *, cwd: Path | None = None, timeout: float = 60
) -> str:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"{command!r} failed: {err.decode()[-2000:]}"
    return out.decode()


async def test_the_banner_commands_run_as_printed_in_a_fresh_shell(tmp_path: Path) -> None:
    try:
        find_broker_binary()
    except EmbeddedBrokerError as exc:
        unavailable(str(exc))
    if shutil.which("bash") is None or shutil.which("curl") is None:
        unavailable("bash and curl are needed to run the banner's commands")
    state_home = tmp_path / "home"
    state_home.mkdir()
    env = clean_shell_env(state_home)
    dev = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "dev",
        "--port",
        "0",
        "--admin-port",
        "0",
        env={**os.environ, "XDG_STATE_HOME": str(state_home)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    tail: asyncio.subprocess.Process | None = None
    try:
        assert dev.stdout is not None
        commands = banner_commands(await read_whole_banner(dev.stdout))
        assert set(commands) >= {
            "Send a test callback (the seed's completed-video example)",
            "Simulate Luma sending whole generation lifecycles",
            "Follow the events as they arrive",
            "Run the example downstream service",
            "To type `luma-kafka-bridge` without its path, activate the virtualenv first",
        }, commands
        state_file = state_home / "luma-kafka-bridge" / "dev.json"
        assert state_file.is_file()

        # tail as printed (bounded), then simulate as printed: tail shows what simulate sent.
        tail = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            commands["Follow the events as they arrive"] + " --max-events 3",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert tail.stderr is not None
        async with asyncio.timeout(30):
            while b"following" not in (line := await tail.stderr.readline()):
                assert line, "tail exited before following anything"
        summary = await run_in_fresh_shell(
            commands["Simulate Luma sending whole generation lifecycles"], env
        )
        assert "answered 200: 30" in summary, summary
        async with asyncio.timeout(30):
            tailed, _ = await tail.communicate()
        assert tail.returncode == 0
        assert len(tailed.decode().splitlines()) == 3

        answer = await run_in_fresh_shell(
            commands["Send a test callback (the seed's completed-video example)"], env
        )
        assert json.loads(answer)["status"] == "accepted"

        handled = await run_in_fresh_shell(
            commands["Run the example downstream service"] + " --max-events 1", env
        )
        assert handled == ""  # it logs to stderr; success is its exit status

        activate = commands[
            "To type `luma-kafka-bridge` without its path, activate the virtualenv first"
        ]
        version = await run_in_fresh_shell(f"{activate} && luma-kafka-bridge --version", env)
        assert version.startswith("luma-kafka-bridge ")

        # examples/README.md's commands, from the repository root, as written there.
        _, example_cmd, simulate_cmd = examples_readme_commands()
        await run_in_fresh_shell(example_cmd + " --max-events 1", env, cwd=ROOT)
        assert "answered 200: 20" in await run_in_fresh_shell(simulate_cmd, env, cwd=ROOT)

        dev.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await dev.wait() == 0
        assert not state_file.exists()
    finally:
        for process in (tail, dev):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
