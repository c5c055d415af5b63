"""Attacks on the real server process (the CLI, a real broker): slow-loris and connection
floods do not keep a legitimate callback from being answered within 1 s, and no
configured secret ever shows in a log line or on /metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import resource
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bridge.delivery.topics import create_topics
from bridge.edge.signing import sign
from tests.conftest import KafkaBroker
from tests.faults.harness import TOKEN, BridgeProcess, new_prefix
from tests.helpers import SEED_COMPLETED_VIDEO, bridge_settings, topics_visible, wait_until

pytestmark = pytest.mark.integration

HMAC_KEY = b"attack-test-hmac-key-0123456789"
HMAC_SECRET = "whsec_" + base64.b64encode(HMAC_KEY).decode()
FILE_TOKEN = "file-token-abcdefghijklmnop"
MAX_CONNECTIONS = 100
ANSWER_WITHIN = 1.0
# The attackers connect from another loopback address than the legitimate sender.
ATTACKER = ("127.0.0.2", 0)
HEADER_TIMEOUT = 3
OPEN_FILES = 256  # below the 300 slow-loris connections of the attack


def require_attacker_address() -> None:
    """The attacks come from 127.0.0.2; where it cannot be bound, no attack would happen."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(ATTACKER)
    except OSError as exc:
        pytest.fail(f"cannot bind the attacker address {ATTACKER[0]}: {exc}")
    finally:
        probe.close()


@pytest.fixture(scope="module")
def bridge(kafka_broker: KafkaBroker) -> Iterator[BridgeProcess]:
    """One bridge process for the module: tokens file, HMAC, a low connection bound, DEBUG logs."""
    require_attacker_address()
    prefix = new_prefix()
    settings = bridge_settings(
        kafka_broker.bootstrap, kafka_broker.supports_idempotence, topic_prefix=prefix
    )
    asyncio.run(create_topics(settings))
    asyncio.run(topics_visible(settings))
    workdir = Path(tempfile.mkdtemp(prefix="luma-bridge-attack-"))
    tokens_file = workdir / "tokens"
    tokens_file.write_text(FILE_TOKEN + "\n")
    process = BridgeProcess(
        kafka_broker.bootstrap,
        spool_dir=workdir / "spool",
        prefix=prefix,
        log_level="DEBUG",
        kafka_enable_idempotence=str(kafka_broker.supports_idempotence).lower(),
        auth_tokens_file=tokens_file,
        hmac_secrets=HMAC_SECRET,
        max_connections=MAX_CONNECTIONS,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=3,
    )
    # A low open-files limit, inherited by the bridge: without the connection bound the
    # attacks below would exhaust it and nobody, Luma included, could connect.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(OPEN_FILES, hard), hard))
    try:
        process.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        asyncio.run(process.wait_ready())
        yield process
    finally:
        process.stop()


async def legit_callback(bridge: BridgeProcess, n: int) -> tuple[int, float]:
    """One signed callback on a fresh connection; its status and how long the answer took."""
    body = json.dumps({**SEED_COMPLETED_VIDEO, "id": f"legit-{n}-{time.monotonic_ns()}"}).encode()
    now = int(time.time())
    webhook_id = f"msg-{n}-{time.monotonic_ns()}"
    headers = {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(HMAC_KEY, webhook_id, now, body),
    }
    started = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(5)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(bridge.url, data=body, headers=headers, timeout=timeout) as r,
    ):
        await r.read()
        return r.status, time.monotonic() - started


async def legit_callbacks_during(bridge: BridgeProcess, seconds: float) -> list[tuple[int, float]]:
    results = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        results.append(await legit_callback(bridge, n))
        n += 1
        await asyncio.sleep(0.2)
    return results


@dataclass
class Attack:
    """What the attackers saw: connections opened, and those the bridge closed early.

    A connection closed by the bridge before its head deadline was closed to make room
    for a newcomer: the proof that the attack reached the connection bound.
    """

    opened: int = 0
    closed_to_make_room: int = 0


async def attacker_connection(
    port: int, attack: Attack
) -> tuple[asyncio.StreamWriter, asyncio.Task[None]]:
    """A connection from the attacker address and a task that notes an early close by the bridge."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=ATTACKER)
    attack.opened += 1
    opened = time.monotonic()

    async def watch() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await reader.read()
        if not writer.is_closing() and time.monotonic() - opened < HEADER_TIMEOUT - 1:
            attack.closed_to_make_room += 1

    return writer, asyncio.create_task(watch())


async def slow_loris(port: int, stop: asyncio.Event, attack: Attack) -> None:
    """A connection that sends one header byte a second, reconnecting when cut off."""
    head = f"POST /luma/callback/{'x' * 20} HTTP/1.1\r\nHost: b\r\nX-Pad: {'a' * 500}".encode()
    while not stop.is_set():
        try:
            writer, watcher = await attacker_connection(port, attack)
        except ConnectionError:
            await asyncio.sleep(0.05)  # refused while the bridge is busy: try again
            continue
        try:
            for byte in head:
                if stop.is_set() or watcher.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1.0)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            await watcher


async def flooder(port: int, stop: asyncio.Event, attack: Attack) -> None:
    """Opens connections as fast as it can and keeps them, silent."""
    held: list[tuple[asyncio.StreamWriter, asyncio.Task[None]]] = []
    while not stop.is_set():
        try:
            held.append(await attacker_connection(port, attack))
        except ConnectionError:
            await asyncio.sleep(0.01)
        if len(held) > 40:
            writer, watcher = held.pop(0)
            writer.close()
            await watcher
        await asyncio.sleep(0)
    for writer, watcher in held:
        writer.close()
        await watcher


async def under_attack(  # type: ignore[no-untyped-def]
    bridge: BridgeProcess, attackers: int, attack_with
) -> tuple[list[tuple[int, float]], Attack]:
    stop = asyncio.Event()
    attack = Attack()
    tasks = [asyncio.create_task(attack_with(bridge.port, stop, attack)) for _ in range(attackers)]
    try:
        await wait_until(
            lambda: attack.closed_to_make_room > 0 or any(task.done() for task in tasks),
            timeout=15,
            what="the attack to fill every connection slot",
        )
        for task in tasks:
            if task.done():
                task.result()  # an attacker that died (e.g. cannot bind 127.0.0.2) fails the test
        return await legit_callbacks_during(bridge, seconds=4), attack
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def assert_the_bound_was_reached(attack: Attack) -> None:
    assert attack.opened > MAX_CONNECTIONS, f"only {attack.opened} attacking connections"
    assert attack.closed_to_make_room > 0, "the bridge never had to make room: no attack"


def assert_answered_in_time(results: list[tuple[int, float]]) -> None:
    assert results, "no legitimate callback was sent"
    statuses = [status for status, _ in results]
    slowest = max(elapsed for _, elapsed in results)
    assert statuses == [200] * len(results), statuses
    assert slowest < ANSWER_WITHIN, f"slowest legitimate callback took {slowest:.3f}s"


async def test_slow_loris_does_not_hold_the_bridge(bridge: BridgeProcess) -> None:
    results, attack = await under_attack(bridge, 3 * MAX_CONNECTIONS, slow_loris)
    assert_the_bound_was_reached(attack)
    assert_answered_in_time(results)


async def test_a_connection_flood_does_not_lock_luma_out(bridge: BridgeProcess) -> None:
    results, attack = await under_attack(bridge, 8, flooder)
    assert_the_bound_was_reached(attack)
    assert_answered_in_time(results)


async def test_no_secret_in_any_log_line_or_metric(bridge: BridgeProcess) -> None:
    # Requests that put the secrets where they could leak: path, query, headers, bodies.
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{bridge.port}"
        attempts = [
            ("POST", f"/luma/callback/{TOKEN}", {}, b"{not json"),
            ("POST", f"/luma/callback/{FILE_TOKEN}?token={TOKEN}", {}, b"[]"),
            ("POST", f"/luma/callback/{TOKEN}/extra", {}, b"{}"),
            ("GET", f"/luma/callback/{TOKEN}", {}, b""),
            ("POST", "/luma/callback", {"Authorization": f"Bearer {TOKEN}"}, b"{}"),
            ("POST", f"/nope/{TOKEN}", {"webhook-signature": HMAC_SECRET}, b"{}"),
            ("POST", f"/luma/callback/{TOKEN}", {"X-Big": TOKEN * 1000}, b"{}"),
        ]
        for method, path, headers, body in attempts:
            async with http.request(method, base + path, headers=headers, data=body) as r:
                answer = await r.read()
                assert r.status != 500
                for secret in (TOKEN, FILE_TOKEN, HMAC_SECRET):
                    assert secret.encode() not in answer
        assert (await legit_callback(bridge, 999))[0] == 200
        async with http.get(f"http://127.0.0.1:{bridge.admin_port}/metrics") as r:
            metrics = await r.text()
    log = await asyncio.to_thread(Path(bridge.log.name).read_text)
    assert '"callback"' in log, "the log holds no callback lines: the check would prove nothing"
    secrets = {
        "token": TOKEN,
        "file token": FILE_TOKEN,
        "hmac secret": HMAC_SECRET,
        "hmac key (base64 body)": HMAC_SECRET.removeprefix("whsec_"),
    }
    for what, secret in secrets.items():
        leaking = [line for line in log.splitlines() if secret in line]
        assert not leaking, f"{what} in the log: {leaking[:3]}"
        assert secret not in metrics, f"{what} on /metrics"
