"""What the callback port answers for each verdict of a verifier (a fake here; the real one
against the fake Luma API is in tests/integration/test_verification.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from bridge.contract.callback import Callback
from bridge.delivery.verification import Action, Verdict, Verified
from bridge.ops.metrics import Metrics
from bridge.server import callback_app, open_callback_listener
from tests.edge.support import PATH, SEED_BODY, edge_settings
from tests.helpers import MemoryPublisher


class FakeVerifier:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.seen: list[Callback] = []

    async def verify(self, callback: Callback) -> Verdict:
        self.seen.append(callback)
        return self.verdict


class Served:
    def __init__(self, publisher: MemoryPublisher, metrics: Metrics, port: int) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.url = f"http://127.0.0.1:{port}{PATH}"

    async def post(self, body: bytes = SEED_BODY) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.url, data=body, headers={"Content-Type": "application/json"}) as r,
        ):
            return r.status, await r.json(), dict(r.headers)

    def counted(self, outcome: str) -> float:
        labels = {"state": "completed", "outcome": outcome}
        return self.metrics.registry.get_sample_value("luma_bridge_callbacks_total", labels) or 0


@asynccontextmanager
async def serving(verifier: FakeVerifier | None) -> AsyncIterator[Served]:
    settings = edge_settings()
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    app = callback_app(settings, publisher=publisher, metrics=metrics, verifier=verifier)
    runner, site = await open_callback_listener(app, settings, metrics=metrics)
    try:
        yield Served(publisher, metrics, site.port)
    finally:
        await runner.cleanup()


def verified_headers(publisher: MemoryPublisher) -> list[bytes | None]:
    return [dict(record.headers).get("luma-verified") for record in publisher.records]


async def test_a_refused_callback_is_401_with_the_reason_and_written_nowhere() -> None:
    refused = Verdict(Verified.FALSE, Action.REFUSE, "not confirmed: Luma's API does not know it")
    verifier = FakeVerifier(refused)
    async with serving(verifier) as edge:
        status, body, _ = await edge.post()
        assert (status, body) == (
            401,
            {"status": "unauthorized", "error": "not confirmed: Luma's API does not know it"},
        )
        assert edge.publisher.records == []
        assert edge.counted("unauthorized") == 1
        # Luma retries: the retry is checked again, not taken for a duplicate.
        status, _, _ = await edge.post()
        assert status == 401
        assert len(verifier.seen) == 2


async def test_a_callback_that_cannot_be_checked_in_time_is_503_for_luma_to_retry() -> None:
    later = Verdict(Verified.UNKNOWN, Action.RETRY_LATER, "cannot verify ... now (timeout)")
    async with serving(FakeVerifier(later)) as edge:
        status, body, headers = await edge.post()
        assert status == 503
        assert body["status"] == "unavailable"
        assert headers["Retry-After"] == "1"
        assert edge.publisher.records == []


async def test_every_record_of_a_written_callback_carries_the_verdict() -> None:
    for verified in Verified:
        async with serving(FakeVerifier(Verdict(verified, Action.WRITE))) as edge:
            status, body, _ = await edge.post()
            assert (status, body["status"]) == (200, "accepted")
            assert verified_headers(edge.publisher) == [verified.value.encode()] * 2


async def test_without_a_verifier_records_carry_no_verdict() -> None:
    async with serving(None) as edge:
        status, _, _ = await edge.post()
        assert status == 200
        assert verified_headers(edge.publisher) == [None, None]


async def test_a_duplicate_is_not_verified_again() -> None:
    verifier = FakeVerifier(Verdict(Verified.TRUE, Action.WRITE))
    async with serving(verifier) as edge:
        assert (await edge.post())[0] == 200
        status, body, _ = await edge.post()
        assert (status, body.get("duplicate")) == (200, True)
        assert len(verifier.seen) == 1


async def test_an_invalid_body_is_dead_lettered_without_asking_the_verifier() -> None:
    verifier = FakeVerifier(Verdict(Verified.FALSE, Action.REFUSE, "no"))
    async with serving(verifier) as edge:
        status, _, _ = await edge.post(json.dumps({"not": "a generation"}).encode())
        assert status == 400
        assert verifier.seen == []
