"""A small downstream service: reacts to completed and failed Luma generations.

Try it against `luma-kafka-bridge dev` (it prints the embedded broker's address):

    luma-kafka-bridge dev
    python examples/downstream_service.py --bootstrap 127.0.0.1:PORT
    luma-kafka-bridge simulate --url 'CALLBACK URL FROM dev' --count 20

Stop it with Ctrl-C and start it again: it resumes after the last generation it
handled (its consumer group keeps the position) and never handles one twice
within the helper's window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from bridge.consume import GenerationConsumer, GenerationEvent

log = logging.getLogger("downstream")


async def on_completed(event: GenerationEvent) -> None:
    """Where a real service would download the asset, notify the user, bill, ..."""
    log.info("ready: %s (%s) %s", event.generation_id, event.model or "?", event.asset_url)


async def on_failed(event: GenerationEvent) -> None:
    log.warning("failed: %s: %s", event.generation_id, event.failure_reason)


async def run(bootstrap: str, group: str, max_events: int | None) -> None:
    handled = 0
    async with GenerationConsumer(
        group_id=group, states=["completed", "failed"], bootstrap_servers=bootstrap
    ) as events:
        async for event in events:
            if event.stale:  # e.g. a late `completed` after `failed`: nothing new to do
                continue
            await (on_completed if event.state == "completed" else on_failed)(event)
            handled += 1
            if max_events is not None and handled >= max_events:
                await events.commit()  # leaving the loop: mark this last one handled too
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--group", default="downstream-example", help="consumer group")
    parser.add_argument("--max-events", type=int, default=None, help="stop after N events")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.bootstrap, args.group, args.max_events))


if __name__ == "__main__":
    main()
