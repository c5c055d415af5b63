"""A fake of Luma's Dream Machine API, and a sender that loses callbacks the way Luma does.

`FakeLumaAPI` serves what the callbacks announced, in the official `lumaai` SDK's
shape: `GET /generations/{id}` (a `Generation`) and `GET /generations?limit=&offset=`
(`{"generations": [...], "count", "has_more", "limit", "offset"}`, newest first), under
`/dream-machine/v1` like the real base URL. It checks `Authorization: Bearer <key>`
(401 otherwise, never echoing what was sent), and answers 429 (with `Retry-After`) or
5xx on demand, so the reconciler's backoff can be exercised.

`send_lifecycles` plays Luma's side of many generations: each goes queued → dreaming
→ completed (or failed) in the fake API, and each state is POSTed to the generation's
callback URL with Luma's retries (3, 100 ms apart). A chosen share of generations
loses one or more callbacks for good, as when Luma gave up after its retries (some
lose every callback); a share is submitted with another system's callback URL, so
only the API knows them. Anyone can then watch `reconcile` complete the lifecycles.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bridge.devtools.simulate import (
    LUMA_RETRIES,
    LUMA_RETRY_DELAY,
    LUMA_TIMEOUT,
    SimulateOptions,
    Summary,
    deliver,
    generation_lifecycle,
)

#: Where the real API lives below its host; the fake serves the same paths.
API_PATH = "/dream-machine/v1"
MAX_LIST_LIMIT = 100
FOREIGN_CALLBACK_URL = "https://elsewhere.example.com/hooks/luma"


@dataclass(frozen=True, slots=True)
class Fault:
    """An answer the fake gives instead of the real one."""

    status: int
    retry_after: float | None = None


class FakeLumaAPI:
    """In-memory generations behind Luma's API paths. Use `async with` or `start()`/`stop()`.

    `put()` records a generation's current state (what Luma's API would report);
    `fail_next()` queues 429s or 5xx; `fault_ratio` answers that share of requests
    with `fault`; `stop_answering()` holds every request (`held` counts them) until
    `answer_again()`. `requests` counts answers by (endpoint, status).
    """

    def __init__(
        self,
        *,
        api_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        fault_ratio: float = 0.0,
        fault: Fault = Fault(503),
        delay: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("the fake Luma API needs an API key to check")
        if not 0.0 <= fault_ratio <= 1.0:
            raise ValueError("fault_ratio must be between 0 and 1")
        self._api_key = api_key
        self._host = host
        self._port = port
        self.fault_ratio = fault_ratio
        self.fault = fault
        self.delay = delay
        self._rng = random.Random(seed)  # noqa: S311 - fault injection, not cryptography
        self._generations: dict[str, dict[str, Any]] = {}
        self._newest_first: list[str] = []
        self._faults: deque[Fault] = deque()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.held = 0
        self._answering = asyncio.Event()
        self._answering.set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """What to pass as `base_url` to `AsyncLumaAI` (or `LUMA_BRIDGE_LUMA_BASE_URL`)."""
        return f"http://{self._host}:{self.port}{API_PATH}"

    def put(self, generation: dict[str, Any]) -> None:
        """Create a generation or move it to a new state (the whole `Generation` object)."""
        generation_id = generation["id"]
        if generation_id not in self._generations:
            self._newest_first.insert(0, generation_id)
        self._generations[generation_id] = generation

    def remove(self, generation_id: str) -> None:
        """Forget a generation: the API answers 404 for it from now on."""
        if self._generations.pop(generation_id, None) is not None:
            self._newest_first.remove(generation_id)

    def get(self, generation_id: str) -> dict[str, Any] | None:
        return self._generations.get(generation_id)

    @property
    def generations(self) -> dict[str, dict[str, Any]]:
        """Every generation by id, as the API reports it now."""
        return dict(self._generations)

    def fail_next(self, count: int, status: int = 429, retry_after: float | None = 1.0) -> None:
        """Answer the next `count` requests with `status` (and `Retry-After` when given)."""
        self._faults.extend([Fault(status, retry_after)] * count)

    def stop_answering(self) -> None:
        """Hold every request from now on, as an API that accepts connections and hangs."""
        self._answering.clear()

    def answer_again(self) -> None:
        """Answer the held requests and every one after them."""
        self._answering.set()

    def app(self) -> web.Application:
        application = web.Application(middlewares=[self._guard])
        application.router.add_get(f"{API_PATH}/generations", self._list)
        application.router.add_get(f"{API_PATH}/generations/{{generation_id}}", self._get)
        return application

    async def start(self) -> FakeLumaAPI:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = self._runner.addresses[-1][1]
        return self

    async def stop(self) -> None:
        """Stop serving. Safe to call twice."""
        runner, self._runner = self._runner, None
        self.answer_again()  # a held request would keep the cleanup waiting
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeLumaAPI:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        endpoint = "list" if request.match_info.get("generation_id") is None else "get"
        response = await self._answer(request, handler)
        self.requests[(endpoint, response.status)] += 1
        return response

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self._answering.is_set():
            self.held += 1
            try:
                await self._answering.wait()
            finally:
                self.held -= 1
        if request.headers.get("Authorization", "") != f"Bearer {self._api_key}":
            # Like any API: say what is wrong, never repeat the credential sent.
            return _json({"detail": "Invalid or missing API key"}, status=401)
        fault = self._next_fault()
        if fault is not None:
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after else {}
            return _json({"detail": "injected fault"}, status=fault.status, headers=headers)
        response: web.StreamResponse = await handler(request)
        return response

    def _next_fault(self) -> Fault | None:
        if self._faults:
            return self._faults.popleft()
        if self.fault_ratio and self._rng.random() < self.fault_ratio:
            return self.fault
        return None

    async def _get(self, request: web.Request) -> web.Response:
        generation = self._generations.get(request.match_info["generation_id"])
        if generation is None:
            return _json({"detail": "Generation not found"}, status=404)
        return _json(generation)

    async def _list(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "10"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            return _json({"detail": "limit and offset must be integers"}, status=422)
        if not 1 <= limit <= MAX_LIST_LIMIT or offset < 0:
            return _json(
                {"detail": f"limit must be 1 to {MAX_LIST_LIMIT}, offset at least 0"}, status=422
            )
        ids = self._newest_first[offset : offset + limit]
        page = [self._generations[generation_id] for generation_id in ids]
        return _json(
            {
                "generations": page,
                "count": len(page),
                "has_more": offset + limit < len(self._newest_first),
                "limit": limit,
                "offset": offset,
            }
        )


def _json(
    document: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(document),
        status=status,
        content_type="application/json",
        headers=headers,
    )


@dataclass(frozen=True)
class SenderOptions:
    """How `send_lifecycles` plays Luma: how many generations, how fast, what it loses."""

    callback_url: str
    count: int = 100
    drop_ratio: float = 0.0
    drop_all_ratio: float = 0.25
    foreign_ratio: float = 0.0
    foreign_url: str = FOREIGN_CALLBACK_URL
    step_seconds: float = 1.0
    rate: float = 50.0
    seed: int | None = None
    retries: int = LUMA_RETRIES
    retry_delay: float = LUMA_RETRY_DELAY
    timeout: float = LUMA_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("drop_ratio", "drop_all_ratio", "foreign_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.count < 0 or self.rate <= 0 or self.step_seconds < 0:
            raise ValueError("count must be at least 0, rate above 0, step_seconds at least 0")


@dataclass
class SenderReport:
    """What `send_lifecycles` did, generation by generation."""

    ours: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    gave_up: set[str] = field(default_factory=set)
    delivery: Summary = field(default_factory=Summary)

    @property
    def lost_some(self) -> set[str]:
        """Generations of ours that lost at least one callback, dropped or given up on."""
        return set(self.dropped) | self.gave_up

    def as_dict(self) -> dict[str, Any]:
        return {
            "generations": len(self.ours) + len(self.foreign),
            "ours": len(self.ours),
            "foreign": len(self.foreign),
            "dropped_callbacks": sum(len(states) for states in self.dropped.values()),
            "generations_dropping_callbacks": len(self.dropped),
            "generations_dropping_every_callback": sum(
                1 for states in self.dropped.values() if len(states) == 3
            ),
            "generations_losing_callbacks": len(self.lost_some),
            "callbacks_sent": self.delivery.sent,
            "answered_200": self.delivery.delivered,
            "given_up_after_retries": self.delivery.gave_up,
        }


def choose_drops(rng: random.Random, options: SenderOptions, states: list[str]) -> list[str]:
    """Which of one generation's callbacks are lost: none, some, or (drop_all_ratio) all."""
    if rng.random() >= options.drop_ratio:
        return []
    if rng.random() < options.drop_all_ratio:
        return list(states)
    count = rng.randint(1, len(states) - 1)
    return sorted(rng.sample(states, count), key=states.index)


async def send_lifecycles(
    api: FakeLumaAPI, options: SenderOptions, *, session: aiohttp.ClientSession | None = None
) -> SenderReport:
    """Run `options.count` generations through the fake API, POSTing their callbacks.

    Generations start `options.rate` per second; each state lasts `step_seconds`.
    Returns once every generation reached its final state.
    """
    rng = random.Random(options.seed)  # noqa: S311 - test traffic, not cryptography
    report = SenderReport()
    delivery = SimulateOptions(
        url=options.callback_url,
        retries=options.retries,
        retry_delay=options.retry_delay,
        timeout=options.timeout,
    )

    async def one(lifecycle: list[dict[str, Any]], drops: list[str], foreign: bool) -> None:
        generation_id = lifecycle[0]["id"]
        for index, document in enumerate(lifecycle):
            if index:
                await asyncio.sleep(options.step_seconds)
            api.put(document)
            if foreign or document["state"] in drops:
                continue
            gave_up_before = report.delivery.gave_up
            await deliver(client, orjson.dumps(document), delivery, report.delivery)
            if report.delivery.gave_up > gave_up_before:
                report.gave_up.add(generation_id)

    client = session or aiohttp.ClientSession()
    tasks: list[asyncio.Task[None]] = []
    try:
        started = time.monotonic()
        for number in range(options.count):
            await asyncio.sleep(max(0.0, started + number / options.rate - time.monotonic()))
            foreign = rng.random() < options.foreign_ratio
            lifecycle = _lifecycle(rng, options, foreign)
            states = [document["state"] for document in lifecycle]
            drops = [] if foreign else choose_drops(rng, options, states)
            generation_id = lifecycle[0]["id"]
            (report.foreign if foreign else report.ours).append(generation_id)
            if drops:
                report.dropped[generation_id] = drops
            tasks.append(asyncio.create_task(one(lifecycle, drops, foreign)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if session is None:
            await client.close()
    return report


def _lifecycle(rng: random.Random, options: SenderOptions, foreign: bool) -> list[dict[str, Any]]:
    """simulate's lifecycle, created now, with its callback URL in `request`."""
    url = options.foreign_url if foreign else options.callback_url
    return [
        {**document, "request": {**document["request"], "callback_url": url}}
        for document in generation_lifecycle(rng, datetime.now(UTC))
    ]
