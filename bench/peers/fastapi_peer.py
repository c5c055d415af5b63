"""A typical hand-written peer: FastAPI + uvicorn, aiokafka `send_and_wait` per request.

What a team would write in an afternoon: a pydantic model as the body parameter,
a token check, then the per-state and the lifecycle record written with
`send_and_wait` (acks=all), 200 once both are acknowledged. uvicorn runs with its
defaults (uvloop and httptools when installed, access log at INFO).
Run: python -m bench.peers.fastapi_peer --port 9001 --bootstrap 127.0.0.1:9092 --token T
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict

STATES = {"queued", "dreaming", "completed", "failed"}


class Generation(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    state: str
    failure_reason: str | None = None
    created_at: str | None = None
    assets: dict[str, Any] | None = None
    model: str | None = None
    request: dict[str, Any] | None = None


def create_app(bootstrap: str, token: str, prefix: str = "luma.generation") -> FastAPI:
    producer: AIOKafkaProducer | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal producer
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=False
        )
        await producer.start()
        try:
            yield
        finally:
            await producer.stop()

    app = FastAPI(lifespan=lifespan)

    @app.post("/luma/callback/{path_token}")
    async def callback(path_token: str, generation: Generation) -> dict[str, str]:
        if path_token != token:
            raise HTTPException(status_code=401, detail="wrong token")
        assert producer is not None
        value = generation.model_dump_json().encode()
        key = generation.id.encode()
        state = generation.state if generation.state in STATES else "unknown"
        await producer.send_and_wait(f"{prefix}.{state}", value, key=key)
        await producer.send_and_wait(f"{prefix}.lifecycle", value, key=key)
        return {"status": "accepted"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--token", default=os.environ.get("PEER_TOKEN", "bench"))
    args = parser.parse_args()
    uvicorn.run(create_app(args.bootstrap, args.token), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
