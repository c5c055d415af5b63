"""`deadletter replay` against a real broker: valid letters become a fresh callback's records,
invalid ones stay on the dead-letter topic, and nothing is routed twice."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer

from bridge.consume.deadletter import replay_dead_letters
from bridge.contract.callback import deadletter_headers, parse_callback, record_headers
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.consume.support import send
from tests.helpers import (
    SEED_COMPLETED_VIDEO,
    SEED_FAILED_VIDEO,
    bridge_settings,
    read_topic,
    running_bridge,
)

pytestmark = pytest.mark.integration

RECEIVED_AT = datetime(2026, 5, 30, 12, 0, 0, 123000, tzinfo=UTC)
GARBAGE = b'{"id":"abc","state":7}'


async def write_letters(settings: Settings, bodies: list[bytes]) -> None:
    """Dead letters as an older bridge with a stricter check would have left them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False
    )
    await producer.start()
    try:
        for body in bodies:
            headers = deadletter_headers("not a valid Generation: model: unknown", RECEIVED_AT)
            await producer.send_and_wait(
                f"{settings.topic_prefix}.deadletter", body, key=None, headers=headers
            )
    finally:
        await producer.stop()


async def test_replay_routes_what_is_valid_now_and_keeps_the_rest(
    kafka_broker: KafkaBroker,
) -> None:
    settings = bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)
    prefix = settings.topic_prefix
    completed = json.dumps(SEED_COMPLETED_VIDEO).encode()
    failed = json.dumps(SEED_FAILED_VIDEO, indent=2).encode()  # not compact, as Luma might send
    async with running_bridge(settings) as server:
        await send(server, GARBAGE, status=400)  # really refused by the bridge
    await write_letters(settings, [completed, failed, completed])

    dry = await replay_dead_letters(settings, dry_run=True)
    assert (dry.examined, dry.routed, dry.still_failing) == (4, 3, 1)

    summary = await replay_dead_letters(settings)
    assert (summary.examined, summary.routed, summary.duplicates, summary.still_failing) == (
        4,
        2,
        1,
        1,
    )

    (routed,) = await read_topic(kafka_broker.bootstrap, f"{prefix}.completed", expected=1)
    fresh = parse_callback(completed)
    assert routed.key == SEED_COMPLETED_VIDEO["id"].encode()
    assert routed.value == fresh.value
    assert list(routed.headers) == record_headers(fresh, RECEIVED_AT)
    (routed_failed,) = await read_topic(kafka_broker.bootstrap, f"{prefix}.failed", expected=1)
    assert routed_failed.value == json.dumps(SEED_FAILED_VIDEO, separators=(",", ":")).encode()
    lifecycle = await read_topic(kafka_broker.bootstrap, f"{prefix}.lifecycle", expected=2)
    assert len(lifecycle) == 2

    letters = await read_topic(kafka_broker.bootstrap, f"{prefix}.deadletter", expected=5)
    original, kept = sorted(
        (letter for letter in letters if letter.value == GARBAGE), key=lambda r: r.timestamp
    )
    assert kept.key is None
    assert dict(kept.headers)["luma-received-at"] == dict(original.headers)["luma-received-at"]
    assert b"state" in dict(kept.headers)["luma-error"]

    # A second replay (from the command line) sees only the letter that still fails.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "deadletter",
        "replay",
        "--json",
        "--kafka-bootstrap-servers",
        settings.kafka_bootstrap_servers,
        "--topic-prefix",
        prefix,
        "--kafka-enable-idempotence",
        str(kafka_broker.supports_idempotence).lower(),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    again = json.loads(out.decode().splitlines()[-1])
    assert (again["examined"], again["routed"], again["still_failing"]) == (1, 0, 1)
    assert len(await read_topic(kafka_broker.bootstrap, f"{prefix}.completed", expected=1)) == 1


async def test_replay_of_an_empty_dead_letter_topic_does_nothing(
    kafka_broker: KafkaBroker,
) -> None:
    settings = bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)
    async with running_bridge(settings):
        pass
    summary = await replay_dead_letters(settings)
    assert summary.examined == 0
