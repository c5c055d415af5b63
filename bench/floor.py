"""The floor: the least an HTTP-to-Kafka service must do per callback, and nothing more.

An aiohttp app (uvloop, no access log) whose handler reads the body, takes the generation
id and state from it (orjson), and writes the bridge's two records: the per-state and the
lifecycle record, same topics, key, value and headers (the `luma-*` and CloudEvents
`ce_*` set, with ids of the same length), acks=all, the bridge's own producer settings
(`producer_options` of the default `Settings`; idempotence off against Tansu, on with
`--idempotent` against Apache Kafka, as the bridge's default). Both
records are handed to the producer at once and the answer waits for both
acknowledgements, as the bridge does. No validation, spool, dedupe, logs or metrics.
The bridge's CPU per callback is measured against this one (issue 14: at most 1.5 x).

`--naive` turns it into the equal-work naive peer: the same records written with two
`send_and_wait` one after the other and aiokafka's default producer settings
(acks=all, idempotence off), stdlib `json` and `web.json_response`: what most teams
write first.
Run: python -m bench.floor --port 9002 --bootstrap 127.0.0.1:9092 [--naive]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer

from bench.minimal import serve
from bridge.contract.callback import (
    CLOUDEVENTS_SPECVERSION,
    CLOUDEVENTS_TYPE_PREFIX,
    CONTENT_TYPE,
    DEFAULT_CLOUDEVENTS_SOURCE,
    SOURCE_CALLBACK,
)
from bridge.delivery.publisher import producer_options
from bridge.server import tune_garbage_collection
from bridge.settings import load_settings

PRODUCER = web.AppKey("producer", AIOKafkaProducer)
PREFIX = "luma.generation"
_SPEC = CLOUDEVENTS_SPECVERSION.encode()
_SOURCE = SOURCE_CALLBACK.encode()
_CE_SOURCE = DEFAULT_CLOUDEVENTS_SOURCE.encode()


def record_headers(body: bytes, generation: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The bridge's header set for this body, with ids of the bridge's length (one hash)."""
    identity = hashlib.blake2b(body, digest_size=16).hexdigest().encode()
    state = str(generation["state"])
    received = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    received_bytes = received.encode()
    return [
        ("content-type", CONTENT_TYPE),
        ("luma-event-id", identity),
        ("luma-transition-id", identity),
        ("luma-state", state.encode()),
        ("luma-received-at", received_bytes),
        ("luma-source", _SOURCE),
        ("luma-generation-type", str(generation.get("generation_type", "video")).encode()),
        ("ce_specversion", _SPEC),
        ("ce_id", identity),
        ("ce_source", _CE_SOURCE),
        ("ce_type", (CLOUDEVENTS_TYPE_PREFIX + state).encode()),
        ("ce_subject", str(generation["id"]).encode()),
        ("ce_time", received_bytes),
    ]


async def floor_callback(request: web.Request) -> web.Response:
    body = await request.read()
    generation = orjson.loads(body)
    key = str(generation["id"]).encode()
    headers = record_headers(body, generation)
    producer = request.app[PRODUCER]
    sent = [
        await producer.send(f"{PREFIX}.{generation['state']}", body, key=key, headers=headers),
        await producer.send(f"{PREFIX}.lifecycle", body, key=key, headers=headers),
    ]
    await asyncio.gather(*sent)
    return web.Response(
        body=orjson.dumps({"status": "accepted", "event_id": headers[1][1].decode()}),
        content_type="application/json",
    )


async def naive_callback(request: web.Request) -> web.Response:
    body = await request.read()
    generation = json.loads(body)
    key = str(generation["id"]).encode()
    headers = record_headers(body, generation)
    producer = request.app[PRODUCER]
    await producer.send_and_wait(f"{PREFIX}.{generation['state']}", body, key=key, headers=headers)
    await producer.send_and_wait(f"{PREFIX}.lifecycle", body, key=key, headers=headers)
    return web.json_response({"status": "accepted", "event_id": headers[1][1].decode()})


def create_app(bootstrap: str, *, naive: bool = False, idempotent: bool = False) -> web.Application:
    if naive:
        options: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "acks": "all",
            "enable_idempotence": False,
        }
    else:
        settings = load_settings(
            kafka_bootstrap_servers=bootstrap, kafka_enable_idempotence=idempotent
        )
        options = producer_options(settings)

    async def producer_ctx(app: web.Application) -> AsyncIterator[None]:
        producer = AIOKafkaProducer(**options)
        await producer.start()
        app[PRODUCER] = producer
        yield
        await producer.stop()

    app = web.Application(client_max_size=1024 * 1024)
    app.cleanup_ctx.append(producer_ctx)
    handler = naive_callback if naive else floor_callback
    app.router.add_post("/luma/callback/{token}", handler)
    return app


async def tuned_garbage_collection(app: web.Application) -> None:
    """The bridge's collector settings on the floor, to show what they are worth alone."""
    tune_garbage_collection()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--naive", action="store_true", help="two send_and_wait per request")
    parser.add_argument(
        "--idempotent", action="store_true", help="the idempotent producer (Apache Kafka)"
    )
    parser.add_argument(
        "--gc-tuned",
        action="store_true",
        help="the garbage collector as `serve` sets it, once the producer is started",
    )
    args = parser.parse_args()
    app = create_app(args.bootstrap, naive=args.naive, idempotent=args.idempotent)
    if args.gc_tuned:
        app.on_startup.append(tuned_garbage_collection)
    serve(app, args.host, args.port)


if __name__ == "__main__":
    main()
