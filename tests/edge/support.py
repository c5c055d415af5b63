"""An in-process callback listener exactly as `serve` builds it, on an in-memory publisher,
and a raw HTTP/1.1 client for requests no well-behaved client would send."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from bridge.edge.limits import GuardedSite
from bridge.ops.metrics import Metrics
from bridge.server import callback_app, open_callback_listener
from bridge.settings import Settings, load_settings
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN, MemoryPublisher

HMAC_SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
HMAC_KEY = b"k" * 32
PATH = f"/luma/callback/{TOKEN}"
# Every status the callback port is documented to answer (README "Status codes").
DOCUMENTED_STATUSES = {200, 400, 401, 404, 405, 408, 413, 415, 429, 431, 503}
SEED_BODY = json.dumps(SEED_COMPLETED_VIDEO).encode()


def edge_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "auth_tokens": TOKEN,
        "topic_prefix": "t",
        "spool_enabled": False,
        "max_body_bytes": 64 * 1024,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass
class Edge:
    """The listener, its publisher and its metrics."""

    settings: Settings
    publisher: MemoryPublisher
    metrics: Metrics
    runner: web.AppRunner
    site: GuardedSite

    @property
    def port(self) -> int:
        return self.site.port

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def exposition(self) -> str:
        return generate_latest(self.metrics.registry).decode()


@asynccontextmanager
async def running_edge(
    ssl_context: ssl.SSLContext | None = None, **overrides: Any
) -> AsyncIterator[Edge]:
    settings = edge_settings(**overrides)
    publisher = MemoryPublisher()
    metrics = Metrics(CollectorRegistry())
    app = callback_app(settings, publisher=publisher, metrics=metrics)
    runner, site = await open_callback_listener(
        app, settings, metrics=metrics, ssl_context=ssl_context
    )
    try:
        yield Edge(settings, publisher, metrics, runner, site)
    finally:
        await runner.cleanup()


@dataclass
class RawAnswer:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: bytes


def request_bytes(
    method: str = "POST",
    path: str = PATH,
    body: bytes = SEED_BODY,
    headers: dict[str, str] | None = None,
    *,
    content_length: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bridge"]
    merged = {"Content-Type": "application/json", **(headers or {})}
    if content_length:
        merged.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> RawAnswer:
    """One HTTP/1.1 answer, or status None if the server closed the connection first."""
    async with asyncio.timeout(timeout):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return RawAnswer(None, {}, b"")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        try:
            body = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            body = b""
        return RawAnswer(int(status_line.split(" ")[1]), headers, body)


async def send_raw(port: int, data: bytes, *, timeout: float = 5.0) -> RawAnswer:
    """Send `data` on a fresh connection and read one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with suppress(ConnectionError):
            await writer.drain()
        return await read_answer(reader, timeout)
    finally:
        writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
