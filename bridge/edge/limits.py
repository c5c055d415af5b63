"""What a client may hold on the callback port: connections, and time to send a request head.

aiohttp's server bounds the size of a request head (`max_line_size`,
`max_field_size`, `max_headers`) but not how long a client may take to send it,
nor how many connections may be open: a slow-loris client (a header byte every
few seconds) holds a connection forever, and enough of them exhaust the process's
file descriptors. `GuardedRequestHandler` is aiohttp's own `RequestHandler` with
three additions, kept to its public hooks (`connection_made`, `connection_lost`,
`finish_response`, `handle_error`):

* a head deadline: from connecting (or from the previous answer on a kept-alive
  connection) a request head must arrive within HEADER_TIMEOUT, else the
  connection is closed. The handler marks the head as arrived (`request_started`,
  called from the app's middleware); the body has its own timeout in `bridge.edge.http`.
* a place among at most MAX_CONNECTIONS: a new connection beyond the bound closes
  an idle one (still waiting for a head), else one still sending its body: the
  oldest of the peer address holding the most, so neither a flood of idle
  connections nor of slow bodies from some addresses can lock Luma out. Only when
  every connection holds a request the bridge is working on is the new one answered
  503 at once and closed.
* error answers that never echo the input (aiohttp's quote the offending line) and
  are not logged with it: the request line may hold the token.

`GuardedSite` listens with that handler in place of aiohttp's own. This is the
only place that reaches below aiohttp's `AppRunner`/`TCPSite` API.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import resource
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_request import BaseRequest

from bridge.ops.metrics import Metrics

log = logging.getLogger("bridge.edge.limits")

# After an early answer (401, 413, 408), the rest of the body is read and dropped for
# at most this long, so the client sees the answer instead of a reset.
LINGER_SECONDS = 1.0
# File descriptors kept aside for Kafka, the spool, the admin port and logs.
RESERVED_FDS = 64
SHED_CONNECTIONS = "connection_limit"


def _refusal() -> bytes:
    body = json.dumps(
        {"status": "unavailable", "error": "too many connections; retry later"}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_REFUSAL = _refusal()


class Phase(enum.IntEnum):
    """Where a connection is; the lower, the sooner it is closed to make room."""

    IDLE = 0  # waiting for (the rest of) a request head
    READING = 1  # head received, body still arriving
    WORKING = 2  # the bridge is handling the request: never closed to make room


class ConnectionGuard:
    """The open connections of one listener, oldest first, and the limits they live under."""

    def __init__(self, *, max_connections: int, header_timeout: float, metrics: Metrics) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._metrics = metrics
        self._open: dict[GuardedRequestHandler, None] = {}  # insertion order: oldest first
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        metrics.shed.labels(reason=SHED_CONNECTIONS)

    def __len__(self) -> int:
        return len(self._open)

    def connections(self) -> list[GuardedRequestHandler]:
        """The open connections, oldest first."""
        return list(self._open)

    def admit(self, handler: GuardedRequestHandler) -> bool:
        """Make room for `handler`: False when it must be refused."""
        if len(self._open) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                self.refused += 1
                self._metrics.shed.labels(reason=SHED_CONNECTIONS).inc()
                return False
            self.evicted += 1
            self.forget(victim)
            victim.force_close()
        self._open[handler] = None
        return True

    def _victim(self) -> GuardedRequestHandler | None:
        """Whom to close for a newcomer: among the idle connections (else those still
        sending a body), the oldest one of the peer address holding the most of them.

        Counting per peer keeps a flood from one address from pushing out a sender on
        another; behind a proxy every connection shares one peer and this is simply the
        oldest.
        """
        for phase in (Phase.IDLE, Phase.READING):
            oldest: dict[str, GuardedRequestHandler] = {}
            counts: dict[str, int] = {}
            for handler in self._open:  # oldest first
                if handler.phase is phase:
                    oldest.setdefault(handler.peer, handler)
                    counts[handler.peer] = counts.get(handler.peer, 0) + 1
            if counts:
                return oldest[max(counts, key=counts.__getitem__)]
        return None

    def forget(self, handler: GuardedRequestHandler) -> None:
        self._open.pop(handler, None)

    def rejected(self) -> None:
        """A request refused before reaching the app (malformed or oversized head)."""
        self._metrics.callbacks.labels(state="none", outcome="rejected").inc()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with a head deadline and a place in a `ConnectionGuard`."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_deadline: asyncio.TimerHandle | None = None
        self.phase = Phase.IDLE
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        if not self._guard.admit(self):
            with contextlib.suppress(Exception):
                transport.write(_REFUSAL)  # type: ignore[attr-defined]
            self.force_close()
            return
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._guard.forget(self)
        super().connection_lost(exc)

    def request_started(self) -> None:
        """The head has arrived and the app has the request: the head deadline is met."""
        self.phase = Phase.READING
        self._disarm()

    def body_received(self) -> None:
        """The whole body is in: from now on the bridge is working on the request."""
        self.phase = Phase.WORKING

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            # Kept alive: the next head is due within the same deadline.
            self.phase = Phase.IDLE
            if self.transport is not None:
                self._arm()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON answer that names the problem and never quotes the request (or logs it)."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers")
        ):
            status, reason = 431, "request header fields too large"
        elif status == 400:
            reason = "malformed request"
        else:
            log.warning("request failed", extra={"fields": {"error": type(exc).__name__}})
            status, reason = 503, "internal error; retry later"
        self._guard.rejected()
        body = {"status": "unavailable" if status == 503 else "rejected", "error": reason}
        response = web.json_response(body, status=status)
        if status == 503:
            response.headers["Retry-After"] = "1"
        response.force_close()  # the connection's state is unknown after a bad head
        return response

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._head_deadline = loop.call_later(self._guard.header_timeout, self._head_overdue)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self.phase is Phase.IDLE:
            self._guard.timed_out += 1
            self.force_close()


def mark_request_started(request: web.Request) -> None:
    """Called by the app's middleware for every request that reaches it."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.request_started()


def mark_body_received(request: web.Request) -> None:
    """Called by the handler once the body is read, before the request is worked on."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.body_received()


class GuardedSite(web.BaseSite):
    """A TCP listener (plain or TLS) whose connections run `GuardedRequestHandler`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        max_header_bytes: int,
        max_headers: int,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 512,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self.guard = guard
        self._handler_args: dict[str, Any] = {
            "max_line_size": max_header_bytes,
            "max_field_size": max_header_bytes,
            "max_headers": max_headers,
            "keepalive_timeout": guard.header_timeout,
            "lingering_time": LINGER_SECONDS,
            # aiohttp's access log would show the token in the path; edge.http logs it masked.
            "access_log": None,
            # bridge.edge.encoding decodes Content-Encoding, so a body that lies about it is
            # answered 400 with its raw bytes dead-lettered (aiohttp's own decoding fails
            # deep inside the read, with the connection left in an unknown state).
            "auto_decompress": False,
        }
        self.port = 0

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    def _protocol(self) -> GuardedRequestHandler:
        server = self._runner.server
        assert server is not None
        return GuardedRequestHandler(
            server, guard=self.guard, loop=asyncio.get_running_loop(), **self._handler_args
        )

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            # `serve --workers N`: N processes listen on one port, the kernel spreads
            # connections over them.
            reuse_port=self._reuse_port or None,
            # A client that never finishes the TLS handshake is not let hold the socket either.
            ssl_handshake_timeout=self.guard.header_timeout if self._ssl_context else None,
        )
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._port


class BodyBudget:
    """Bytes of request bodies held in memory at once, across every request.

    MAX_INFLIGHT_REQUESTS times MAX_BODY_BYTES is far more than a pod's memory (1024 x
    1 MiB by default): without a global bound, strangers sending large bodies could
    make the bridge buffer its way out of memory. A request reserves what it
    declares (`Content-Length`) before reading, and grows its reservation as chunks
    arrive when it declared nothing; beyond the budget it is answered 503.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def reserve(self, size: int) -> bool:
        """Take `size` more bytes of the budget; False (and nothing taken) when it has no room."""
        if self.held + size > self.max_bytes:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


class BodyLimit:
    """The largest body the callback listener accepts, which Kafka can lower.

    Starts at MAX_BODY_BYTES. When the start-up check reads the topics'
    `max.message.bytes` and one of them cannot take a record that large, the
    server lowers it, so such a body is refused with 413 at the door instead of
    being acknowledged and then refused by Kafka for good.
    """

    def __init__(self, max_body_bytes: int) -> None:
        self.configured = max_body_bytes
        self.bytes = max_body_bytes
        self.because = f"body larger than {max_body_bytes} bytes"

    def lower_to(self, size: int, because: str) -> None:
        """Refuse bodies above `size` (never raises the limit above MAX_BODY_BYTES)."""
        if size < self.configured:
            self.bytes = size
            self.because = because
        else:
            self.bytes = self.configured
            self.because = f"body larger than {self.configured} bytes"


def raise_fd_limit(max_connections: int) -> None:
    """Make room for `max_connections` sockets in the process's file descriptor limit.

    Raises the soft limit up to the hard one; warns when even that is too small,
    since past it `accept()` fails for everyone, Luma included.
    """
    needed = max_connections + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open-files limit is below LUMA_BRIDGE_MAX_CONNECTIONS; lower it or raise "
            "the limit (ulimit -n)",
            extra={"fields": {"limit": soft, "needed": needed}},
        )
