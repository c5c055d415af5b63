"""`luma-kafka-bridge dev`, as a new user runs it: the printed URL accepts the seed example."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys

import aiohttp
import pytest

from bridge.devtools.embedded import EmbeddedBrokerError, find_broker_binary
from tests.conftest import unavailable
from tests.helpers import SEED_COMPLETED_VIDEO, read_topic

pytestmark = pytest.mark.integration


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


async def test_dev_prints_a_url_whose_callbacks_land_on_their_topic() -> None:
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
