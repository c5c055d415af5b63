"""Luma's delivery pattern as a load generator, with an arrival log for the order audit.

Unlike `simulate` (one generation's states one after another), Luma delivers every state
change on its own: a generation's `dreaming` is sent a short time after `queued`
whatever became of `queued`, so both can be in flight at once. Each callback is
retried as Luma does (3 retries, 100 ms apart, 5 s timeout).

Run as `python -m tests.faults.luma_load --url URL --generations N --rate R --gap S
--arrivals FILE`; prints one JSON summary line and writes one JSON line per callback
to FILE: its event id, generation, state, final status, and for a 200 the monotonic
time its accepted attempt was sent (`sent`) and answered (`answered`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bridge.devtools.simulate import generation_lifecycle

RETRIES = 3
RETRY_DELAY = 0.1
TIMEOUT = 5.0


class Load:
    """Sends generations' lifecycles with independent state deliveries; logs arrivals."""

    def __init__(self, url: str, *, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.statuses: Counter[str] = Counter()
        self.final: Counter[str] = Counter()
        self.arrivals: list[dict[str, Any]] = []
        self.sent = 0

    async def run(self, generations: int, rate: float, gap: float, concurrency: int) -> None:
        created = datetime.now(UTC) - timedelta(minutes=2)
        # Luma opens as many connections as it has callbacks in flight; a client-side
        # connection queue would delay sends and scramble their arrival order.
        connector = aiohttp.TCPConnector(limit=concurrency)
        # `sent` is when the request's headers went out, after any connection set-up: two
        # callbacks due at once can leave in either order, and the audit must know which.
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_headers_sent)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            tasks = []
            start = time.monotonic()
            for n in range(generations):
                await _sleep_until(start + n / rate)
                for k, callback in enumerate(generation_lifecycle(self.rng, created)):
                    tasks.append(asyncio.create_task(self._deliver_at(session, callback, k * gap)))
            await asyncio.gather(*tasks)

    async def _deliver_at(
        self, session: aiohttp.ClientSession, callback: dict[str, Any], delay: float
    ) -> None:
        await asyncio.sleep(delay)
        self.sent += 1
        body = json.dumps(callback).encode()
        entry: dict[str, Any] = {"generation": callback["id"], "state": callback["state"]}
        status = "none"
        for attempt in range(RETRIES + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAY)
            moment: dict[str, float] = {}
            status, event_id = await self._post(session, body, moment)
            sent, sent_wall = moment.get("sent", 0.0), moment.get("sent_wall", 0.0)
            self.statuses[status] += 1
            if status == "200":
                entry.update(
                    event_id=event_id, sent=sent, sent_wall=sent_wall, answered=time.monotonic()
                )
                break
        entry["status"] = status
        self.final[status] += 1
        self.arrivals.append(entry)

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, moment: dict[str, float]
    ) -> tuple[str, str | None]:
        try:
            async with session.post(
                self.url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                trace_request_ctx=moment,
            ) as response:
                answer = await response.read()
                if response.status == 200:
                    return "200", json.loads(answer)["event_id"]
                return str(response.status), None
        except TimeoutError:
            return "timeout", None
        except aiohttp.ClientError:
            return "connection error", None

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "statuses": dict(self.statuses),
            "final_statuses": dict(self.final),
        }


async def _headers_sent(
    _: aiohttp.ClientSession, context: Any, __: aiohttp.TraceRequestHeadersSentParams
) -> None:
    moment = context.trace_request_ctx
    moment["sent"], moment["sent_wall"] = time.monotonic(), time.time()


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--generations", type=int, required=True)
    parser.add_argument("--rate", type=float, default=20.0, help="generations started per second")
    parser.add_argument(
        "--gap", type=float, default=0.15, help="seconds between a generation's states"
    )
    parser.add_argument("--concurrency", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--arrivals", type=Path, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    load = Load(args.url, seed=args.seed)
    asyncio.run(load.run(args.generations, args.rate, args.gap, args.concurrency))
    with args.arrivals.open("w") as out:
        for entry in load.arrivals:
            out.write(json.dumps(entry) + "\n")
    print(json.dumps(load.summary()), flush=True)


if __name__ == "__main__":
    main()
