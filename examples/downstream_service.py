"""A small downstream service: reacts to completed and failed Luma generations.

Try it against `luma-kafka-bridge dev`, from the repository root (`make dev` made `.venv`):

    .venv/bin/luma-kafka-bridge dev                     # in one terminal
    .venv/bin/python examples/downstream_service.py     # in another: finds dev's broker
    .venv/bin/luma-kafka-bridge simulate --count 20     # in a third: sends to dev's URL

Without `--bootstrap` it reads the `LUMA_BRIDGE_*` variables like the bridge, and when
they name no broker it uses the one a running `luma-kafka-bridge dev` announced.

Stop it with Ctrl-C and start it again: it resumes after the last generation it
handled (its consumer group keeps the position) and never handles one twice
within the helper's window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from bridge.consume import GenerationConsumer, GenerationEvent
from bridge.devtools.devstate import settings_with_dev_broker
from bridge.settings import Settings

log = logging.getLogger("downstream")


async def on_completed(event: GenerationEvent) -> None:
    """Where a real service would download the asset, notify the user, bill, ..."""
    log.info("ready: %s (%s) %s", event.generation_id, event.model or "?", event.asset_url)


async def on_failed(event: GenerationEvent) -> None:
    log.warning("failed: %s: %s", event.generation_id, event.failure_reason)


async def run(settings: Settings, group: str, max_events: int | None) -> None:
    handled = 0
    async with GenerationConsumer(
        group_id=group, states=["completed", "failed"], settings=settings
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
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="Kafka bootstrap servers (default: LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS, else the "
        "broker of a running `luma-kafka-bridge dev`, else localhost:9092)",
    )
    parser.add_argument("--group", default="downstream-example", help="consumer group")
    parser.add_argument("--max-events", type=int, default=None, help="stop after N events")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = {"kafka_bootstrap_servers": args.bootstrap} if args.bootstrap else {}
    settings = settings_with_dev_broker(overrides, note=sys.stderr)
    log.info("reading %s", settings.kafka_bootstrap_servers)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(settings, args.group, args.max_events))


if __name__ == "__main__":
    main()
