"""A stand-in for Luma: sends callbacks shaped like Luma's, with Luma's delivery behaviour.

Each simulated generation goes queued → dreaming → completed (or failed), as a
video (ray-2) or an image (photon-1). Every callback is retried up to 3 times,
100 ms apart, with a 5 s timeout, on any non-200 answer or transport error, as
Luma documents. It is the tool for trying the bridge and for load tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import aiohttp

from bridge.contract.callback import rfc3339

LUMA_RETRIES = 3
LUMA_RETRY_DELAY = 0.1
LUMA_TIMEOUT = 5.0
FAILURE_REASON = "Generation failed due to invalid keyframe asset."
PROMPTS = (
    "A teddy bear in sunglasses playing electric guitar and dancing",
    "A surfer riding a wave at sunset",
    "Timelapse of a city skyline from dusk to night, neon reflections",
    "Watercolour fox in a snowy forest, soft light — 雪の森",
)


@dataclass(frozen=True)
class SimulateOptions:
    """What `simulate` should send, and how."""

    url: str
    count: int = 12
    concurrency: int = 4
    rate: float | None = None
    invalid_ratio: float = 0.0
    duplicate_ratio: float = 0.0
    seed: int | None = None
    retries: int = LUMA_RETRIES
    retry_delay: float = LUMA_RETRY_DELAY
    timeout: float = LUMA_TIMEOUT


@dataclass
class Summary:
    """What happened, for the printed report and for tests."""

    sent: int = 0
    attempts: int = 0
    retries: int = 0
    delivered: int = 0
    gave_up: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    final_statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    acknowledged_event_ids: list[str] = field(default_factory=list)

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "attempts": self.attempts,
            "retries": self.retries,
            "delivered": self.delivered,
            "gave_up": self.gave_up,
            "statuses": dict(self.statuses),
            "final_statuses": dict(self.final_statuses),
            "latency_ms": {
                "p50": round(self.percentile(0.5) * 1000, 3),
                "p99": round(self.percentile(0.99) * 1000, 3),
            },
        }

    def report(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return (
            f"sent {self.sent} callbacks in {self.attempts} attempts ({self.retries} retries); "
            f"answered 200: {self.delivered}, gave up after retries: {self.gave_up}\n"
            f"answers per attempt: {statuses or 'none'}\n"
            f"latency p50 {self.percentile(0.5) * 1000:.1f} ms, "
            f"p99 {self.percentile(0.99) * 1000:.1f} ms"
        )


def generation_lifecycle(rng: random.Random, created_at: datetime) -> list[dict[str, Any]]:
    """The callbacks Luma sends for one generation, in order."""
    is_video = rng.random() < 0.7
    generation_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    model = "ray-2" if is_video else "photon-1"
    request: dict[str, Any] = {
        "generation_type": "video" if is_video else "image",
        "model": model,
        "prompt": rng.choice(PROMPTS),
        "aspect_ratio": rng.choice(("16:9", "9:16", "1:1")),
        "callback_url": "https://example.com/luma/callback",
    }
    if is_video:
        request.update(loop=rng.random() < 0.2, resolution="720p", duration="5s")
    base = {
        "id": generation_id,
        "generation_type": "video" if is_video else "image",
        "model": model,
        "created_at": rfc3339(created_at),
        "request": request,
    }
    failed = rng.random() < 0.1
    final_assets = (
        {"video": f"https://storage.cdn-luma.com/dream_machine/{generation_id}/video.mp4"}
        if is_video
        else {"image": f"https://storage.cdn-luma.com/dream_machine/{generation_id}/image.jpg"}
    )
    return [
        {**base, "state": "queued", "failure_reason": None, "assets": None},
        {**base, "state": "dreaming", "failure_reason": None, "assets": None},
        {
            **base,
            "state": "failed" if failed else "completed",
            "failure_reason": "Generation failed due to invalid keyframe asset."
            if failed
            else None,
            "assets": None if failed else final_assets,
        },
    ]


def invalid_body(rng: random.Random) -> bytes:
    """A body the bridge must refuse with 400 (and dead-letter)."""
    return rng.choice(
        (
            b"{not json",
            b"[1, 2, 3]",
            b'{"state": "completed"}',
            b'{"id": "", "state": "completed"}',
            b'{"id": "x", "state": "completed", "created_at": "yesterday"}',
        )
    )


def planned_bodies(options: SimulateOptions, rng: random.Random) -> Iterator[list[bytes]]:
    """Groups of bodies to send in order: one generation's callbacks, or one invalid body.

    `options.count` bodies in all. Each one is, with chance `invalid_ratio`, an invalid
    body instead of the next callback of a lifecycle; the lifecycle the count cuts
    short ends early. A redelivered callback counts as one of the `count`.
    """
    remaining = options.count
    created = datetime.now(UTC) - timedelta(minutes=2)
    while remaining > 0:
        lifecycle = [json.dumps(c).encode() for c in generation_lifecycle(rng, created)]
        if rng.random() < options.duplicate_ratio:
            # Luma redelivers the same callback as if our first 200 got lost.
            repeated = rng.randrange(len(lifecycle))
            lifecycle.insert(repeated + 1, lifecycle[repeated])
        group: list[bytes] = []
        for body in lifecycle:
            while remaining > 0 and rng.random() < options.invalid_ratio:
                remaining -= 1
                yield [invalid_body(rng)]
            if remaining == 0:
                break
            group.append(body)
            remaining -= 1
        if group:
            yield group


class Pacer:
    """Spaces sends to a fixed rate across all workers (open loop when rate is set)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = time.monotonic()

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        self._next = max(self._next + self._interval, now)
        if self._next > now:
            await asyncio.sleep(self._next - now)


async def deliver(
    session: aiohttp.ClientSession, body: bytes, options: SimulateOptions, summary: Summary
) -> None:
    """Send one callback as Luma would: retry on anything but 200."""
    summary.sent += 1
    for attempt in range(options.retries + 1):
        if attempt:
            summary.retries += 1
            await asyncio.sleep(options.retry_delay)
        summary.attempts += 1
        started = time.perf_counter()
        status, event_id = await _post(session, options, body)
        summary.latencies.append(time.perf_counter() - started)
        summary.statuses[status] += 1
        if status == "200":
            summary.delivered += 1
            summary.final_statuses[status] += 1
            if event_id:
                summary.acknowledged_event_ids.append(event_id)
            return
    summary.gave_up += 1
    summary.final_statuses[status] += 1


async def _post(
    session: aiohttp.ClientSession, options: SimulateOptions, body: bytes
) -> tuple[str, str | None]:
    """The answer's status (or why there was none) and, on 200, the event id it names."""
    try:
        async with session.post(
            options.url,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=options.timeout),
        ) as response:
            answer = await response.read()
            event_id = None
            if response.status == 200:
                with contextlib.suppress(ValueError, AttributeError):
                    event_id = json.loads(answer).get("event_id")
            return str(response.status), event_id
    except TimeoutError:
        return "timeout", None
    except aiohttp.ClientError:
        return "connection error", None


async def simulate(options: SimulateOptions, *, progress: TextIO | None = None) -> Summary:
    """Send `options.count` callbacks and return what happened."""
    rng = random.Random(options.seed)  # noqa: S311 - test traffic, not cryptography
    summary = Summary()
    plan = planned_bodies(options, rng)
    pacer = Pacer(options.rate)

    async def worker(session: aiohttp.ClientSession) -> None:
        for group in plan:
            for body in group:
                await pacer.wait()
                await deliver(session, body, options, summary)

    connector = aiohttp.TCPConnector(limit=options.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(options.concurrency)]
        reporter = asyncio.create_task(_report_progress(summary, options, progress))
        try:
            await asyncio.gather(*workers)
        finally:
            reporter.cancel()
    return summary


async def _report_progress(summary: Summary, options: SimulateOptions, out: TextIO | None) -> None:
    if out is None:
        return
    while True:
        await asyncio.sleep(1.0)
        print(
            f"  {summary.sent}/{options.count} sent, {summary.delivered} answered 200, "
            f"{summary.retries} retries",
            file=out,
            flush=True,
        )
