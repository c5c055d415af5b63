"""Verification of callbacks end to end: the bridge on the real broker, asking the fake Luma
API through the official `lumaai` client (`LUMA_BRIDGE_VERIFY=tag|enforce`)."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import ConsumerRecord

from bridge.devtools.fake_luma import FakeLumaAPI
from bridge.server import BridgeServer, deadletter_replay
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import (
    SEED_COMPLETED_VIDEO,
    bridge_settings,
    callback_url,
    consume,
    read_topic,
    running_bridge,
)
from tests.integration.test_deadletter_replay import write_letters
from tests.reconcile.support import header

pytestmark = pytest.mark.integration

API_KEY = "luma-verify-e2e-key-71b4f09d2c"
VERIFY_TIMEOUT = 1.0
ACK_TIMEOUT = 3.0
LUMA_DEADLINE = 5.0


def generation(generation_id: str, state: str) -> dict[str, Any]:
    return {**SEED_COMPLETED_VIDEO, "id": generation_id, "state": state}


def verify_settings(broker: KafkaBroker, api_url: str, mode: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "verify": mode,
        "luma_api_key": API_KEY,
        "luma_base_url": api_url,
        "verify_timeout": VERIFY_TIMEOUT,
        "kafka_ack_timeout": ACK_TIMEOUT,
        **overrides,
    }
    if mode == "off":
        values = {k: v for k, v in values.items() if not k.startswith("verify")}
    return bridge_settings(broker.bootstrap, broker.supports_idempotence, **values)


@pytest.fixture
async def api() -> AsyncIterator[FakeLumaAPI]:
    async with FakeLumaAPI(api_key=API_KEY, seed=7) as fake:
        yield fake


@asynccontextmanager
async def bridge_verifying(
    broker: KafkaBroker, api_url: str, mode: str, **overrides: Any
) -> AsyncIterator[BridgeServer]:
    async with running_bridge(verify_settings(broker, api_url, mode, **overrides)) as server:
        yield server


async def post(server: BridgeServer, body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    """The status, the JSON answer and how long the answer took."""
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.post(callback_url(server), json=body) as response,
    ):
        answer = await response.json()
        return response.status, answer, time.monotonic() - started


async def settled(bootstrap: str, topic: str, expected: int) -> list[ConsumerRecord]:
    """`topic` from the start: at least `expected` records, then until a poll brings nothing
    (so a record that should not be there would show as one too many)."""
    return await consume(
        bootstrap, topic, done=lambda records, idle: len(records) >= expected and idle, timeout=60
    )


async def lifecycle(server: BridgeServer, bootstrap: str, expected: int) -> list[ConsumerRecord]:
    return await settled(bootstrap, f"{server.settings.topic_prefix}.lifecycle", expected)


def verdicts(records: list[ConsumerRecord]) -> dict[tuple[str, str], str | None]:
    return {
        (record.key.decode(), header(record, "luma-state") or ""): header(record, "luma-verified")
        for record in records
    }


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/dream-machine/v1"


async def test_enforce_refuses_forgeries_and_accepts_the_real_lifecycle(
    kafka_broker: KafkaBroker, api: FakeLumaAPI
) -> None:
    async with bridge_verifying(kafka_broker, api.base_url, "enforce") as server:
        # A forged `completed` for a generation the account does not have.
        status, answer, _ = await post(server, generation("gen-forged", "completed"))
        assert status == 401
        assert answer == {
            "status": "unauthorized",
            "error": "not confirmed: Luma's API does not know this generation",
        }
        # A forged `completed` for a real generation that Luma's API reports still dreaming.
        api.put(generation("gen-real", "queued"))
        assert (await post(server, generation("gen-real", "queued")))[0] == 200
        api.put(generation("gen-real", "dreaming"))
        assert (await post(server, generation("gen-real", "dreaming")))[0] == 200
        status, answer, _ = await post(server, generation("gen-real", "completed"))
        assert status == 401
        assert "reports this generation dreaming, not completed" in answer["error"]
        # The real `completed`, once Luma's API reports it.
        api.put(generation("gen-real", "completed"))
        status, answer, _ = await post(server, generation("gen-real", "completed"))
        assert (status, answer["status"]) == (200, "accepted")

        records = await lifecycle(server, kafka_broker.bootstrap, 3)
        assert verdicts(records) == {
            ("gen-real", "queued"): "true",
            ("gen-real", "dreaming"): "true",
            ("gen-real", "completed"): "true",
        }
        assert len(records) == 3  # nothing forged, nothing twice
        prefix = server.settings.topic_prefix
        assert (
            await read_topic(kafka_broker.bootstrap, f"{prefix}.deadletter", expected=0, timeout=2)
            == []
        )
        completed = await settled(kafka_broker.bootstrap, f"{prefix}.completed", 1)
        assert [record.key for record in completed] == [b"gen-real"]
        registry = server.metrics.registry
        assert (
            registry.get_sample_value(
                "luma_bridge_verifications_total", {"result": "false", "reason": "not_found"}
            )
            == 1
        )
        assert (
            registry.get_sample_value(
                "luma_bridge_verifications_total", {"result": "false", "reason": "state_ahead"}
            )
            == 1
        )
        assert api.requests[("get", 404)] == 2  # the forgery was looked up once more
        duration = registry.get_sample_value(
            "luma_bridge_verify_luma_api_duration_seconds_count", {"endpoint": "get"}
        )
        assert duration is not None
        assert duration >= 5


async def test_enforce_answers_503_within_lumas_deadline_when_the_api_is_slow(
    kafka_broker: KafkaBroker, api: FakeLumaAPI
) -> None:
    api.put(generation("gen-slow", "completed"))
    api.delay = 2.0  # longer than VERIFY_TIMEOUT: the fake keeps the request that long
    async with bridge_verifying(kafka_broker, api.base_url, "enforce") as server:
        status, answer, took = await post(server, generation("gen-slow", "completed"))
        assert status == 503
        assert "cannot verify this callback with Luma's API now (timeout)" in answer["error"]
        assert took < VERIFY_TIMEOUT + 1.0 < LUMA_DEADLINE
        # Luma's retry once the API answers again is verified and written: the first
        # attempt wrote nothing, or this one would be a duplicate and not the one record.
        api.delay = 0.0
        status, answer, _ = await post(server, generation("gen-slow", "completed"))
        assert (status, answer.get("duplicate")) == (200, None)
        records = await lifecycle(server, kafka_broker.bootstrap, 1)
        assert len(records) == 1
        assert verdicts(records) == {("gen-slow", "completed"): "true"}


async def test_enforce_with_fallback_accept_writes_what_it_cannot_check_as_unknown(
    kafka_broker: KafkaBroker,
) -> None:
    unreachable = closed_port_url()
    async with bridge_verifying(
        kafka_broker, unreachable, "enforce", verify_fallback="accept"
    ) as server:
        status, _, took = await post(server, generation("gen-unchecked", "completed"))
        assert status == 200
        assert took < LUMA_DEADLINE
        records = await lifecycle(server, kafka_broker.bootstrap, 1)
        assert verdicts(records) == {("gen-unchecked", "completed"): "unknown"}
    async with bridge_verifying(kafka_broker, unreachable, "enforce") as server:
        status, answer, _ = await post(server, generation("gen-unchecked-2", "completed"))
        assert (status, answer["status"]) == (503, "unavailable")
        assert "(api_error)" in answer["error"]


async def test_tag_answers_as_off_does_and_labels_every_record(
    kafka_broker: KafkaBroker, api: FakeLumaAPI
) -> None:
    api.put(generation("gen-known", "completed"))
    api.put(generation("gen-behind", "dreaming"))
    inputs = [
        generation("gen-known", "completed"),  # confirmed
        generation("gen-unknown", "completed"),  # 404
        generation("gen-behind", "completed"),  # ahead of the API
        {"id": "x", "state": 3},  # invalid: 400 in every mode
    ]
    answers: dict[str, list[int]] = {}
    for mode in ("off", "tag"):
        async with bridge_verifying(kafka_broker, api.base_url, mode) as server:
            answers[mode] = [(await post(server, body))[0] for body in inputs]
            records = await lifecycle(server, kafka_broker.bootstrap, 3)
        assert len(records) == 3
        if mode == "off":
            assert {header(record, "luma-verified") for record in records} == {None}
            # Off exports no verification series and never asked the API.
            confirmed = {"result": "true", "reason": "confirmed"}
            sample = server.metrics.registry.get_sample_value
            assert sample("luma_bridge_verifications_total", confirmed) is None
            assert sum(api.requests.values()) == 0
        else:
            assert verdicts(records) == {
                ("gen-known", "completed"): "true",
                ("gen-unknown", "completed"): "false",
                ("gen-behind", "completed"): "false",
            }
    assert answers["tag"] == answers["off"] == [200, 200, 200, 400]
    # With the API slow, tag still answers 200 (labelled unknown), within Luma's deadline.
    api.delay = 2.0
    async with bridge_verifying(kafka_broker, api.base_url, "tag") as server:
        status, _, took = await post(server, generation("gen-known", "completed"))
        assert status == 200
        assert took < VERIFY_TIMEOUT + ACK_TIMEOUT < LUMA_DEADLINE
        records = await lifecycle(server, kafka_broker.bootstrap, 1)
        assert verdicts(records) == {("gen-known", "completed"): "unknown"}


async def test_the_api_key_is_in_no_log_metric_or_answer(
    kafka_broker: KafkaBroker, api: FakeLumaAPI, caplog: pytest.LogCaptureFixture
) -> None:
    api.put(generation("gen-seen", "dreaming"))
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        async with bridge_verifying(kafka_broker, api.base_url, "enforce") as server:
            for body in (
                generation("gen-seen", "dreaming"),
                generation("gen-seen", "completed"),
                generation("gen-none", "queued"),
            ):
                status, answer, _ = await post(server, body)
                seen.append(f"{status} {answer}")
            api.put(generation("gen-other", "queued"))
            api.fail_next(3, status=401)  # as if the key had been revoked
            status, answer, _ = await post(server, generation("gen-other", "queued"))
            seen.append(f"{status} {answer}")
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{server.admin_port}/metrics") as response,
            ):
                seen.append(await response.text())
            records = await lifecycle(server, kafka_broker.bootstrap, 1)
    assert [line.split(" ")[0] for line in seen[:4]] == ["200", "401", "401", "503"]
    seen += [bytes(record.value).decode() for record in records]
    seen += [str(record.headers) for record in records]
    assert "luma_bridge_verify_luma_api_errors_total" in seen[4]
    assert "Luma's API refused the API key" in caplog.text
    everything = "\n".join([caplog.text, *seen])
    assert API_KEY not in everything


async def test_a_replayed_dead_letter_is_verified_as_a_live_callback_is(
    kafka_broker: KafkaBroker, api: FakeLumaAPI
) -> None:
    settings = verify_settings(kafka_broker, api.base_url, "enforce")
    async with running_bridge(settings):
        pass  # its topics, created as `serve` finds them
    api.put(generation("gen-real", "completed"))
    real, forged = (
        orjson.dumps(generation(gid, "completed")) for gid in ("gen-real", "gen-forged")
    )
    await write_letters(settings, [forged, real])

    out = io.StringIO()
    code = await deadletter_replay(settings, group_id=None, dry_run=False, as_json=True, out=out)

    assert code == 0
    summary = json.loads(out.getvalue())
    assert (summary["routed"], summary["still_failing"]) == (1, 1)
    assert summary["reasons"] == {"not confirmed: Luma's API does not know this generation": 1}
    records = await settled(kafka_broker.bootstrap, f"{settings.topic_prefix}.lifecycle", 1)
    assert verdicts(records) == {("gen-real", "completed"): "true"}
