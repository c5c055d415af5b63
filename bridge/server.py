"""Running the bridge: start-up, serving, and graceful shutdown, as three visible phases.

`BridgeServer` is what `serve` and `dev` run and what the tests start in-process.

Start-up opens the admin listener and the spool, connects to Kafka and checks
the topics, then opens the callback listener. With the spool on, Kafka being
unreachable does not hold start-up back: callbacks are spooled and the
connection is retried in the background.

Shutdown reverses it: /readyz turns 503, the listener keeps serving for the
drain delay, then stops accepting and finishes in-flight callbacks; the
producer is flushed and what Kafka takes of the spool is drained, all within
SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from bridge.admin import Readiness, create_admin_app
from bridge.auth import TokenAuth
from bridge.http import CallbackHandler, create_app
from bridge.metrics import Metrics
from bridge.pipeline import DedupeWindow, Pipeline
from bridge.publisher import KafkaPublisher, KafkaUnavailable
from bridge.settings import Settings
from bridge.spool import Spool, SpoolDrainer
from bridge.topics import missing_topics, topics_of

log = logging.getLogger("bridge.server")

CONNECT_RETRY_SECONDS = 2.0
HEALTH_CHECK_SECONDS = 5.0
PHASE_STARTING, PHASE_SERVING, PHASE_DRAINING, PHASE_STOPPING = range(4)


class StartupError(RuntimeError):
    """The bridge cannot serve with these settings; the message says what to do."""


class BridgeServer:
    """The callback listener, the admin listener, the producer and the spool, together."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry or CollectorRegistry())
        self.publisher = KafkaPublisher(settings, metrics=self.metrics)
        self.spool = (
            Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes, metrics=self.metrics)
            if settings.spool_enabled
            else None
        )
        self.readiness = Readiness(
            self.metrics, spool_has_room=self.spool.has_room if self.spool else None
        )
        self._admin_runner = web.AppRunner(
            create_admin_app(self.metrics, self.readiness), access_log=None
        )
        self._callback_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._drainer = SpoolDrainer(self.spool, self.publisher) if self.spool else None
        self.callback_port = 0
        self.admin_port = 0

    async def start(self, stopping: asyncio.Event | None = None) -> None:
        """Open the listeners, the spool and the Kafka connection.

        Raises `StartupError` when tokens are not configured, topics are missing or a
        port is taken. Without a spool, waits for Kafka (retrying, with a message each
        time) and returns without serving if `stopping` is set meanwhile.
        """
        self.metrics.phase.set(PHASE_STARTING)
        self._check_auth_configured()
        await self._admin_runner.setup()
        self.admin_port = await _open_site(
            self._admin_runner, self.settings.host, self.settings.admin_port
        )
        if self.spool is not None:
            await self.spool.open()
            self.metrics.spool_oldest_age.set_function(self.spool.oldest_age)
        connected = await self._try_connect()
        if not connected and self.spool is None:
            connected = await self._connect_kafka(stopping or asyncio.Event())
            if not connected:
                return
        if connected:
            await self._check_topics()
        else:
            log.warning("starting without Kafka: callbacks are spooled until it is reachable")
            self._tasks.append(asyncio.create_task(self._connect_in_background()))
        await self._open_callback_listener()
        self._tasks.append(asyncio.create_task(self._watch_kafka()))
        if self._drainer is not None:
            self._tasks.append(asyncio.create_task(self._drainer.run()))
        self.readiness.update(accepting=True)
        self.metrics.phase.set(PHASE_SERVING)

    async def stop(self) -> None:
        """Drain and stop everything that was started, in reverse order. Safe to call twice."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.metrics.phase.set(PHASE_DRAINING)
        self.readiness.update(accepting=False)
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout):
                await self._close_callback_listener()
        except TimeoutError:
            log.warning("shutdown timeout reached before in-flight callbacks finished")
        self.metrics.phase.set(PHASE_STOPPING)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._drainer is not None and self.publisher.connected:
            await self._drainer.drain_until(deadline - 1.0)
        # Flushes whatever the producer still buffers.
        await self.publisher.stop()
        if self.spool is not None:
            if self.spool.records:
                log.warning(
                    "exiting with records in the spool; they are sent at the next start",
                    extra={"fields": {"records": self.spool.records}},
                )
            await self.spool.close()
        await self._admin_runner.cleanup()

    async def _open_callback_listener(self) -> None:
        self._callback_runner = web.AppRunner(
            self._callback_app(),
            access_log=None,  # it would log the token in the path; http.py logs a masked line
            shutdown_timeout=self.settings.shutdown_timeout,
        )
        await self._callback_runner.setup()
        self.callback_port = await _open_site(
            self._callback_runner, self.settings.host, self.settings.port
        )
        log.info(
            "serving",
            extra={
                "fields": {
                    "callback": f"http://{self.settings.host}:{self.callback_port}"
                    f"{self.settings.callback_path}/<token>",
                    "admin": f"http://{self.settings.host}:{self.admin_port}",
                    "kafka": self.settings.kafka_bootstrap_servers,
                }
            },
        )

    async def _close_callback_listener(self) -> None:
        if self._callback_runner is None:
            return
        if self.settings.drain_delay:
            log.info("draining", extra={"fields": {"delay_s": self.settings.drain_delay}})
            await asyncio.sleep(self.settings.drain_delay)
        runner, self._callback_runner = self._callback_runner, None
        # Stops accepting, then waits for in-flight callbacks to be answered.
        await runner.cleanup()

    def _check_auth_configured(self) -> None:
        if not self.settings.auth_tokens and not self.settings.allow_unauthenticated:
            raise StartupError(
                "no tokens configured: set LUMA_BRIDGE_AUTH_TOKENS (or --auth-tokens) to one "
                "or more secrets, or LUMA_BRIDGE_ALLOW_UNAUTHENTICATED=true for local experiments"
            )

    async def _try_connect(self) -> bool:
        try:
            await self.publisher.start()
        except KafkaUnavailable as exc:
            log.warning(
                "cannot reach Kafka (check LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS and that the "
                "brokers are up); retrying",
                extra={
                    "fields": {
                        "kafka": self.settings.kafka_bootstrap_servers,
                        "reason": exc.reason,
                        "retry_in_s": CONNECT_RETRY_SECONDS,
                    }
                },
            )
            return False
        self.readiness.update(kafka_reachable=True)
        return True

    async def _connect_kafka(self, stopping: asyncio.Event) -> bool:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), CONNECT_RETRY_SECONDS)
            if not stopping.is_set() and await self._try_connect():
                return True
        return False

    async def _connect_in_background(self) -> None:
        await self._connect_kafka(stopping=asyncio.Event())  # until connected or cancelled
        missing = await missing_topics(self.settings)
        if missing:
            log.error(
                "topics missing; spooled callbacks wait until they exist "
                "(create them with `luma-kafka-bridge topics create`)",
                extra={"fields": {"missing": missing}},
            )
        if self.spool is not None:
            self.spool.wakeup.set()

    async def _check_topics(self) -> None:
        if not self.settings.check_topics:
            return
        missing = await missing_topics(self.settings)
        if missing:
            raise StartupError(
                f"topics missing on {self.settings.kafka_bootstrap_servers}: {', '.join(missing)}; "
                "create them with `luma-kafka-bridge topics create` (same settings), "
                "or set LUMA_BRIDGE_CHECK_TOPICS=false if the cluster auto-creates topics"
            )

    def _callback_app(self) -> web.Application:
        settings = self.settings
        pipeline = Pipeline(
            publisher=self.publisher,
            topics=topics_of(settings),
            metrics=self.metrics,
            ack_timeout=settings.kafka_ack_timeout,
            lifecycle=settings.lifecycle_topic,
            dedupe=DedupeWindow(
                size=settings.dedupe_window_size, ttl=settings.dedupe_window_seconds
            ),
            spool=self.spool,
        )
        handler = CallbackHandler(
            pipeline=pipeline,
            auth=TokenAuth(
                settings.token_values(), allow_unauthenticated=settings.allow_unauthenticated
            ),
            metrics=self.metrics,
            max_body_bytes=settings.max_body_bytes,
            max_inflight=settings.max_inflight_requests,
        )
        return create_app(
            handler=handler,
            metrics=self.metrics,
            callback_path=settings.callback_path,
            max_body_bytes=settings.max_body_bytes,
        )

    async def _watch_kafka(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            reachable = await self.publisher.check_connection(within=HEALTH_CHECK_SECONDS / 2)
            if reachable != self.readiness.kafka_reachable:
                log.warning("Kafka reachable" if reachable else "Kafka unreachable")
            self.readiness.update(kafka_reachable=reachable)


async def _open_site(runner: web.AppRunner, host: str, port: int) -> int:
    """Listen on host:port and return the port really bound (for port 0)."""
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound: int = runner.addresses[-1][1]
    return bound


def install_signal_handlers(stopping: asyncio.Event) -> None:
    """First SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second signal: exiting without finishing the shutdown")
            os._exit(128 + signum)
        log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def serve(
    settings: Settings, *, on_serving: Callable[[BridgeServer], None] | None = None
) -> None:
    """Run the bridge until SIGTERM or SIGINT, then shut down gracefully."""
    stopping = asyncio.Event()
    install_signal_handlers(stopping)
    server = BridgeServer(settings)
    try:
        await server.start(stopping)
        if not stopping.is_set() and on_serving is not None:
            on_serving(server)
        await stopping.wait()
    finally:
        await server.stop()
