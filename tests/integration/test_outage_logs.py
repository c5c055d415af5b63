"""What `serve` logs while its only broker refuses connections: aiokafka's client retries
without pause while records wait, and logs every failed connection and metadata update
at ERROR (tens of thousands of lines a minute were seen in an outage). The bridge lets
each kind of aiokafka line through once per window (`bridge.ops.logs.RepeatedLines`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError
from bridge.ops.logs import REPEAT_WINDOW_SECONDS
from tests.conftest import unavailable
from tests.faults.harness import (
    BridgeProcess,
    aiokafka_lines,
    new_prefix,
    repeated_within_window,
)
from tests.helpers import SEED_COMPLETED_VIDEO, wait_until

#: Long enough for a window to end and the next line of each kind to say what it held back.
OBSERVED_SECONDS = REPEAT_WINDOW_SECONDS * 1.5


async def post(http: aiohttp.ClientSession, url: str, number: int) -> int:
    body = {**SEED_COMPLETED_VIDEO, "id": f"c0ffee00-0000-4000-8000-{number:012d}"}
    async with http.post(url, json=body) as response:
        return response.status


async def test_while_its_only_broker_refuses_aiokafka_lines_are_held_back(tmp_path: Path) -> None:
    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        unavailable(f"no embedded broker: {exc}")
    bridge = BridgeProcess(
        broker.bootstrap, spool_dir=tmp_path / "spool", prefix=new_prefix(), check_topics="false"
    ).start()
    try:
        await bridge.wait_ready()
        async with aiohttp.ClientSession() as http:
            assert await post(http, bridge.url, 0) == 200
            broker.stop()  # refused from now on (memory-only: it is not started again)
            # Answered from the spool; their records wait in the producer, which retries.
            assert [await post(http, bridge.url, n) for n in range(1, 4)] == [200] * 3
        log = Path(bridge.log.name)
        await wait_until(lambda: bool(aiokafka_lines(log)), timeout=30, what="aiokafka's lines")
        await asyncio.sleep(OBSERVED_SECONDS)  # an observation window, not a wait
    finally:
        bridge.stop()
        broker.stop()
    lines = aiokafka_lines(log)
    assert repeated_within_window(lines, REPEAT_WINDOW_SECONDS) == {}
    assert any("more like this" in line["message"] for line in lines), lines
