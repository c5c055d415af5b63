"""End to end against a real broker: every status code, every topic, the record contract."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from lumaai.types import Generation as LumaGeneration

from bridge.contract.callback import KNOWN_STATES
from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker
from bridge.server import BridgeServer, StartupError
from tests.conftest import KafkaBroker
from tests.helpers import (
    SEED_COMPLETED_VIDEO,
    SEED_FAILED_VIDEO,
    TOKEN,
    bridge_settings,
    callback_url,
    read_topic,
    running_bridge,
    wait_until,
)

pytestmark = pytest.mark.integration


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = kwargs.pop("headers", {"Content-Type": "application/json"})
    async with http.post(url, data=data, headers=headers, **kwargs) as response:
        return response.status, await response.json(), response.headers


def header_map(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


async def test_seed_completed_video_lands_on_completed_topic_keyed_by_id(
    bridge: BridgeServer, http: aiohttp.ClientSession, kafka_bootstrap: str
) -> None:
    status, answer, _ = await post(http, callback_url(bridge), SEED_COMPLETED_VIDEO)

    assert status == 200
    assert answer["status"] == "accepted"
    prefix = bridge.settings.topic_prefix
    (record,) = await read_topic(kafka_bootstrap, f"{prefix}.completed", expected=1)
    assert record.key == b"d1ad97c4-9d8f-4e3a-9c2e-3b8c0b9b1e2a"
    assert json.loads(record.value) == SEED_COMPLETED_VIDEO
    assert record.value == json.dumps(SEED_COMPLETED_VIDEO, separators=(",", ":")).encode()
    headers = header_map(record)
    assert headers["content-type"] == b"application/json"
    assert headers["luma-event-id"].decode() == answer["event_id"]
    assert headers["luma-state"] == b"completed"
    assert headers["luma-received-at"].endswith(b"Z")
    assert "luma-generation-type" not in headers  # the seed example has none
    (lifecycle,) = await read_topic(kafka_bootstrap, f"{prefix}.lifecycle", expected=1)
    assert (lifecycle.key, lifecycle.value) == (record.key, record.value)


async def test_seed_failed_video_and_every_state_route_to_their_topics(
    bridge: BridgeServer, http: aiohttp.ClientSession, kafka_bootstrap: str
) -> None:
    prefix = bridge.settings.topic_prefix
    status, _, _ = await post(http, callback_url(bridge), SEED_FAILED_VIDEO)
    assert status == 200
    for state in ("queued", "dreaming", "completed", "paused-by-luma"):
        body = {**SEED_COMPLETED_VIDEO, "id": f"gen-{state}", "state": state}
        status, _, _ = await post(http, callback_url(bridge), body)
        assert status == 200, state

    for state in KNOWN_STATES:
        records = await read_topic(kafka_bootstrap, f"{prefix}.{state}", expected=1)
        assert {json.loads(r.value)["state"] for r in records} == {state}
    (unknown,) = await read_topic(kafka_bootstrap, f"{prefix}.unknown", expected=1)
    assert unknown.key == b"gen-paused-by-luma"
    assert header_map(unknown)["luma-state"] == b"paused-by-luma"
    lifecycle = await read_topic(kafka_bootstrap, f"{prefix}.lifecycle", expected=5)
    assert len(lifecycle) == 5


async def test_value_is_lossless_and_parses_with_the_lumaai_sdk(
    bridge: BridgeServer, http: aiohttp.ClientSession, kafka_bootstrap: str
) -> None:
    body = {
        "id": "7c1f0a52-1b8e-4f6e-9d55-2f0f6f3c7a10",
        "state": "completed",
        "generation_type": "video",
        "model": "ray-2",
        "created_at": "2026-05-30T12:34:56.123456+02:00",
        "failure_reason": None,
        "assets": {"video": "https://x/v.mp4", "progress_video": None, "thumbnail": "https://x/t"},
        "request": {
            "generation_type": "video",
            "model": "ray-2",
            "prompt": "雪の森の狐 🦊 " + "long prompt " * 40_000,
            "keyframes": {"frame0": {"type": "image", "url": "https://x/f.jpg"}},
            "future_option": {"nested": [1, 2.5, True, None]},
        },
        "a_member_luma_adds_next_year": {"x": 1},
        "big_integer": 123456789012345678901234567890,
    }
    status, _, _ = await post(http, callback_url(bridge), body)
    assert status == 200

    prefix = bridge.settings.topic_prefix
    (record,) = await read_topic(kafka_bootstrap, f"{prefix}.completed", expected=1)
    assert json.loads(record.value) == body
    assert header_map(record)["luma-generation-type"] == b"video"
    parsed = LumaGeneration.model_validate_json(record.value)
    assert parsed.id == body["id"]
    assert parsed.state == "completed"
    assert parsed.assets is not None
    assert parsed.assets.video == "https://x/v.mp4"


async def test_invalid_body_is_dead_lettered_raw_and_answered_400(
    bridge: BridgeServer, http: aiohttp.ClientSession, kafka_bootstrap: str
) -> None:
    raw = b'{"id": "abc", "state": 7, "secret": "\xc3\xa9"}'
    status, answer, _ = await post(http, callback_url(bridge), raw)

    assert status == 400
    assert answer["status"] == "invalid"
    assert "state" in answer["error"]
    assert "secret" not in answer["error"]
    prefix = bridge.settings.topic_prefix
    (dead,) = await read_topic(kafka_bootstrap, f"{prefix}.deadletter", expected=1)
    assert dead.value == raw
    assert b"state" in header_map(dead)["luma-error"]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1,2]", b'{"state":"completed"}', b'{"id":"x","state":""}', b""],
)
async def test_every_kind_of_invalid_body_gets_400(
    bridge: BridgeServer, http: aiohttp.ClientSession, body: bytes
) -> None:
    status, answer, _ = await post(http, callback_url(bridge), body)
    assert (status, answer["status"]) == (400, "invalid")


async def test_unauthenticated_requests_write_nothing(
    bridge: BridgeServer, http: aiohttp.ClientSession, kafka_bootstrap: str
) -> None:
    base = f"http://127.0.0.1:{bridge.callback_port}{bridge.settings.callback_path}"
    for url in (base, f"{base}/wrong-token", f"{base}?token=wrong"):
        for body in (SEED_COMPLETED_VIDEO, b"not json"):
            status, answer, _ = await post(http, url, body)
            assert (status, answer["status"]) == (401, "unauthorized")
    # A marker written afterwards proves the topics are readable up to this point.
    status, _, _ = await post(
        http,
        base,
        {**SEED_COMPLETED_VIDEO, "id": "marker"},
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200
    prefix = bridge.settings.topic_prefix
    completed = await read_topic(kafka_bootstrap, f"{prefix}.completed", expected=1)
    assert [r.key for r in completed] == [b"marker"]
    dead = await read_topic(kafka_bootstrap, f"{prefix}.deadletter", expected=0, timeout=1.5)
    assert dead == []


async def test_query_and_bearer_tokens_are_accepted(
    bridge: BridgeServer, http: aiohttp.ClientSession
) -> None:
    base = f"http://127.0.0.1:{bridge.callback_port}{bridge.settings.callback_path}"
    status, answer, _ = await post(http, f"{base}?token={TOKEN}", SEED_COMPLETED_VIDEO)
    assert (status, answer["status"]) == (200, "accepted")
    bearer = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    body = {**SEED_COMPLETED_VIDEO, "id": "sent-with-a-bearer-token"}
    status, answer, _ = await post(http, base, body, headers=bearer)
    assert (status, answer["status"]) == (200, "accepted")
    wrong = {**bearer, "Authorization": f"Bearer {TOKEN}x"}
    status, _, _ = await post(http, base, {**body, "id": "wrong-bearer"}, headers=wrong)
    assert status == 401


async def test_rejections_have_json_bodies_and_the_documented_codes(
    bridge: BridgeServer, http: aiohttp.ClientSession
) -> None:
    url = callback_url(bridge)
    base = f"http://127.0.0.1:{bridge.callback_port}"
    async with http.post(f"{base}/elsewhere", data=b"{}") as response:
        assert response.status == 404
        assert (await response.json())["status"] == "rejected"
    async with http.get(url) as response:
        assert response.status == 405
        assert "POST" in response.headers["Allow"]
    big = b'{"id":"x","state":"completed","pad":"' + b"a" * (1024 * 1024) + b'"}'
    status, answer, _ = await post(http, url, big)
    assert (status, answer["status"]) == (413, "rejected")

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"a" * 100_000

    async with http.post(
        url, data=chunked(), headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 413
    status, answer, _ = await post(
        http, url, SEED_COMPLETED_VIDEO, headers={"Content-Type": "text/plain"}
    )
    assert (status, answer["status"]) == (415, "rejected")


async def test_frozen_broker_without_spool_gives_503_with_retry_after(
    own_broker: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    # The default ack timeout (4 s): the 503 must still come before Luma's 5 s timeout.
    settings = bridge_settings(own_broker.bootstrap, False, spool_enabled=False)
    async with running_bridge(settings) as server:
        status, _, _ = await post(http, callback_url(server), SEED_COMPLETED_VIDEO)
        assert status == 200
        os.kill(own_broker.pid, signal.SIGSTOP)
        try:
            body = {**SEED_COMPLETED_VIDEO, "id": "during-outage"}
            started = time.monotonic()
            status, answer, headers = await post(
                http, callback_url(server), body, timeout=aiohttp.ClientTimeout(total=5)
            )
            elapsed = time.monotonic() - started
            assert status == 503
            assert settings.kafka_ack_timeout <= elapsed < 5, f"answered after {elapsed:.2f}s"
            assert answer["status"] == "unavailable"
            assert headers["Retry-After"] == "1"
            status, _, _ = await post(http, callback_url(server), b"not json")
            assert status == 503  # a dead letter that cannot be written is not answered 400
        finally:
            os.kill(own_broker.pid, signal.SIGCONT)


async def test_serve_stops_with_a_message_naming_missing_topics(
    kafka_broker: KafkaBroker,
) -> None:
    settings = bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)
    with pytest.raises(StartupError) as raised:
        async with running_bridge(settings, create=False):
            pass
    assert f"{settings.topic_prefix}.completed" in str(raised.value)
    assert "topics create" in str(raised.value)


async def test_topics_create_is_idempotent(kafka_broker: KafkaBroker) -> None:
    settings = bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)
    first = await create_topics(settings)
    second = await create_topics(settings)
    assert set(first.values()) == {"created"}
    assert set(second.values()) == {"exists"}
    assert len(first) == 7


async def test_frozen_broker_with_spool_answers_200_and_delivers_after_recovery(
    own_broker: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    settings = bridge_settings(own_broker.bootstrap, False, kafka_ack_timeout=1.0)
    async with running_bridge(settings) as server:
        os.kill(own_broker.pid, signal.SIGSTOP)
        try:
            for state in ("queued", "dreaming", "completed"):
                body = {**SEED_COMPLETED_VIDEO, "state": state}
                status, answer, _ = await post(
                    http, callback_url(server), body, timeout=aiohttp.ClientTimeout(total=5)
                )
                assert (status, answer["status"]) == (200, "accepted")
            assert server.spool is not None
            assert server.spool.records == 6  # per-state + lifecycle, three callbacks
        finally:
            os.kill(own_broker.pid, signal.SIGCONT)
        prefix = settings.topic_prefix
        lifecycle = await read_topic(own_broker.bootstrap, f"{prefix}.lifecycle", expected=3)
        assert [json.loads(r.value)["state"] for r in lifecycle[-3:]] == [
            "queued",
            "dreaming",
            "completed",
        ]
        await wait_until(
            lambda: server.spool is not None and server.spool.records == 0, what="spool drained"
        )
