"""`luma-kafka-bridge tail` as a user runs it: a subprocess reading a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer

from bridge.contract.callback import parse_callback, record_headers
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


async def write_old_records(settings: Settings, count: int) -> None:
    """Records already on the lifecycle topic, in one batch (one partition, one send)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_idempotence=False,
        linger_ms=200,
    )
    await producer.start()
    try:
        sent = []
        for n in range(count):
            callback = parse_callback(json.dumps(generation(f"old-{n}", "queued")).encode())
            sent.append(
                await producer.send(
                    f"{settings.topic_prefix}.lifecycle",
                    callback.value,
                    key=b"one-partition",
                    headers=record_headers(callback, datetime.now(UTC)),
                )
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def test_tail_without_from_beginning_prints_only_new_events(
    bridge: BridgeServer, settings: Settings
) -> None:
    # Tansu answers "latest" with the offset after the first record of the last batch,
    # not after the batch: a consumer starting there would read old records first.
    await write_old_records(settings, 3)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "tail",
        "--max-events",
        "1",
        "--kafka-bootstrap-servers",
        settings.kafka_bootstrap_servers,
        "--topic-prefix",
        settings.topic_prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            while b"following" not in await process.stderr.readline():
                pass
            # Keep sending until tail shows something: it starts reading at its first fetch.
            sent = 0
            while process.returncode is None:
                await send(bridge, generation(f"new-{sent}", "queued"))
                sent += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(process.wait()), 0.5)
        out = await process.stdout.read() if process.stdout else b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    (line,) = out.decode().splitlines()
    assert line.split()[2].startswith("new-"), line
