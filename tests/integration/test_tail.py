"""`luma-kafka-bridge tail` as a user runs it: a subprocess reading a real broker."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.consume.support import generation, send
from tests.helpers import SEED_COMPLETED_VIDEO, SEED_FAILED_VIDEO

pytestmark = pytest.mark.integration


async def run_tail(settings: Settings, *args: str, timeout: float = 20.0) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "tail",
        "--from-beginning",
        "--kafka-bootstrap-servers",
        settings.kafka_bootstrap_servers,
        "--topic-prefix",
        settings.topic_prefix,
        "--log-format",
        "text",
        *args,
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
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


async def test_tail_prints_one_readable_line_per_event(
    bridge: BridgeServer, settings: Settings
) -> None:
    await send(bridge, SEED_COMPLETED_VIDEO)
    await send(bridge, SEED_FAILED_VIDEO)
    image = generation("gen-img", "completed", generation_type="image", model="photon-1")
    image["assets"] = {"image": "https://cdn/x.jpg"}
    await send(bridge, image)
    late = generation(SEED_COMPLETED_VIDEO["id"], "dreaming", assets=None)
    await send(bridge, late)

    lines = await run_tail(settings, "--max-events", "4")

    by_id: dict[str, list[list[str]]] = {}
    for line in lines:
        fields = line.split(None, 5)  # the last field (a reason) may hold spaces
        by_id.setdefault(fields[2], []).append(fields)
    assert len(by_id[SEED_COMPLETED_VIDEO["id"]]) == 2, lines
    video, stale = by_id[SEED_COMPLETED_VIDEO["id"]]
    assert video[0].endswith("Z"), lines
    assert video[1:] == [
        "completed",
        SEED_COMPLETED_VIDEO["id"],
        "-",
        "ray-2",
        SEED_COMPLETED_VIDEO["assets"]["video"],
    ]
    assert stale[1] == "dreaming"
    assert stale[-1] == "-  (stale: already completed)"
    (failed,) = by_id[SEED_FAILED_VIDEO["id"]]
    assert failed[1] == "failed"
    assert failed[-1] == SEED_FAILED_VIDEO["failure_reason"]
    (img,) = by_id["gen-img"]
    assert img[1:] == [
        "completed",
        "gen-img",
        "image",
        "photon-1",
        "https://cdn/x.jpg",
    ]


async def test_tail_json_lines_follow_chosen_states(
    bridge: BridgeServer, settings: Settings
) -> None:
    await send(bridge, generation("gen-q", "queued", assets=None))
    await send(bridge, SEED_FAILED_VIDEO)
    await send(bridge, SEED_COMPLETED_VIDEO)

    lines = await run_tail(
        settings, "--state", "completed", "--state", "failed", "--json", "--max-events", "2"
    )

    events = [json.loads(line) for line in lines]
    assert {e["state"] for e in events} == {"completed", "failed"}
    completed = next(e for e in events if e["state"] == "completed")
    assert completed["generation"] == SEED_COMPLETED_VIDEO
    assert completed["asset_url"] == SEED_COMPLETED_VIDEO["assets"]["video"]
    assert completed["topic"] == f"{settings.topic_prefix}.completed"
    assert len(completed["event_id"]) == 32
    assert completed["received_at"].endswith("Z")
    failed = next(e for e in events if e["state"] == "failed")
    assert failed["failure_reason"] == SEED_FAILED_VIDEO["failure_reason"]
