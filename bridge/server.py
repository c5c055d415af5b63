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

The callback listener is built by `callback_app` and `open_callback_listener`,
which the tests also use with an in-memory publisher: what they exercise is what
serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry

from bridge.consume.deadletter import replay_command
from bridge.delivery.compat import check_broker
from bridge.delivery.dedupe import DedupeWindow
from bridge.delivery.lanes import Lanes
from bridge.delivery.offline import drain_spool
from bridge.delivery.pipeline import Pipeline
from bridge.delivery.publisher import KafkaPublisher, KafkaUnavailable, Publisher
from bridge.delivery.spool import Spool
from bridge.delivery.topics import inspect_topics, missing_topics, topics_of
from bridge.delivery.verification import CallbackVerifier
from bridge.edge.access import SourcePolicy
from bridge.edge.auth import Authenticator, TokenAuth, TokenFileError
from bridge.edge.http import CallbackHandler, create_app
from bridge.edge.limits import (
    BodyBudget,
    BodyLimit,
    ConnectionGuard,
    GuardedSite,
    raise_fd_limit,
)
from bridge.edge.ratelimit import RateLimiter
from bridge.edge.signing import SignatureCheck
from bridge.edge.tls import ReloadingTLS, TLSError
from bridge.ops.admin import Readiness, create_admin_app
from bridge.ops.logs import count_dropped_lines
from bridge.ops.metrics import Metrics, VerificationMetrics
from bridge.ops.tracing import TRACING_OFF, Tracing, TracingUnavailable, build_tracing
from bridge.ops.workers import WorkerRole, orphan_spool_dirs, retire_spool_dir
from bridge.settings import MIN_TOKEN_LENGTH, OtelSettings, Settings

if TYPE_CHECKING:
    from bridge.reconcile.verify import VerificationService

log = logging.getLogger("bridge.server")

AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
CONNECT_RETRY_SECONDS = 2.0
# One pass of draining a gone worker's spool; passes repeat until it is empty.
ORPHAN_DRAIN_SECONDS = 60.0
HEALTH_CHECK_SECONDS = 5.0
PHASE_STARTING, PHASE_SERVING, PHASE_DRAINING, PHASE_STOPPING = range(4)


class StartupError(RuntimeError):
    """The bridge cannot serve with these settings; the message says what to do."""


class BridgeServer:
    """The callback listener, the admin listener, the producer and the spool, together."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        tracing: Tracing | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        """`tracing` None: as the `OTEL_*` variables say (`StartupError` if they cannot be met).
        `worker`: one of `serve --workers N`'s processes (it shares the callback port)."""
        self.settings = settings
        self.worker = worker
        self.metrics = Metrics(registry or CollectorRegistry())
        try:
            self.tracing = tracing or build_tracing(OtelSettings(), settings.trusted_proxies)
        except TracingUnavailable as exc:
            raise StartupError(str(exc)) from None
        self.publisher = KafkaPublisher(settings, metrics=self.metrics)
        self.spool = (
            Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes, metrics=self.metrics)
            if settings.spool_enabled
            else None
        )
        self.lanes = Lanes(
            publisher=self.publisher,
            spool=self.spool,
            metrics=self.metrics,
            stall_seconds=settings.spool_stall_seconds,
            dead_letter_topic=topics_of(settings).deadletter,
        )
        self.readiness = Readiness(
            self.metrics,
            spool_has_room=self.spool.has_room if self.spool else None,
            spool_stalled=self.lanes.stalled,
        )
        self._admin_runner = web.AppRunner(
            create_admin_app(self.metrics, self.readiness), access_log=None
        )
        self.verification = build_verification(settings, self.metrics)
        self._callback_runner: web.AppRunner | None = None
        self.auth: Authenticator | None = None
        self.tls: ReloadingTLS | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stalled = False
        self.callback_port = 0
        self.admin_port = 0
        # Lowered by the topic inspection when a topic cannot take a body of MAX_BODY_BYTES.
        self.body_limit = BodyLimit(settings.max_body_bytes)

    async def start(self, stopping: asyncio.Event | None = None) -> None:
        """Open the listeners, the spool and the Kafka connection.

        Raises `IncompatibleBroker` when a reachable broker refuses a request the bridge
        needs (e.g. the idempotent producer), `StartupError` when no credential is
        configured, the tokens file or the TLS files cannot be read, topics are missing
        or a port is taken. Without a spool, waits for Kafka (retrying, with a message
        each time) and returns without serving if `stopping` is set meanwhile.
        """
        self.metrics.phase.set(PHASE_STARTING)
        count_dropped_lines(self.metrics.log_lines_dropped.inc)
        self._check_auth_configured()
        self.auth = build_authenticator(self.settings, metrics=self.metrics)
        self.tls = build_tls(self.settings)
        await self._admin_runner.setup()
        self.admin_port = await _open_site(
            self._admin_runner, self.settings.host, self.settings.admin_port
        )
        if self.spool is not None:
            await self.spool.open()
            self.lanes.open()
            self.metrics.spool_oldest_age.set_function(self.spool.oldest_age)
        # A broker that refuses what we need would otherwise look unreachable forever.
        await check_broker(self.settings)
        connected = await self._try_connect()
        if not connected and self.spool is None:
            connected = await self._connect_kafka(stopping or asyncio.Event())
            if not connected:
                return
        if connected:
            await self._check_topics()
            await self._inspect_topics()
        else:
            log.warning("starting without Kafka: callbacks are spooled until it is reachable")
            self._supervise("connect", self._connect_in_background)
        await self._open_callback_listener()
        self._supervise("kafka_health", self._watch_kafka)
        if self.settings.auth_tokens_file is not None or self.tls is not None:
            self._supervise("file_reload", self._watch_files)
        if self.spool is not None:
            self._supervise("drainer", self.lanes.run)
        orphans = orphan_spool_dirs(self.settings.spool_dir, self.worker)
        if orphans:
            self._supervise("orphan_spools", functools.partial(self._drain_orphans, orphans))
        self.readiness.update(accepting=True)
        self.metrics.phase.set(PHASE_SERVING)

    async def stop(self) -> None:
        """Drain and stop everything that was started, in reverse order. Safe to call twice.

        Bounded: everything, the drain delay included, ends within SHUTDOWN_TIMEOUT (plus
        a fraction of a second for closing files). What Kafka has not acknowledged by
        then stays in the spool for the next start.
        """
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.metrics.phase.set(PHASE_DRAINING)
        self.readiness.update(accepting=False)
        try:
            async with asyncio.timeout(_left(deadline, margin=1.0)):
                await self._close_callback_listener()
        except TimeoutError:
            log.warning("shutdown timeout reached before in-flight callbacks finished")
        self.metrics.phase.set(PHASE_STOPPING)
        if self.spool is not None and self.publisher.connected:
            # The drainer is still running: what Kafka takes now is not left behind.
            await self.lanes.settle(deadline - 2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # Flushes whatever the producer still buffers, if Kafka takes it in time.
        await self.publisher.stop(timeout=_left(deadline, margin=1.5))
        if self.spool is not None:
            if self.spool.records:
                log.warning(
                    "exiting with records in the spool; they are sent at the next start",
                    extra={"fields": {"records": self.spool.records}},
                )
            await self.spool.close()
        if self.verification is not None:
            await self.verification.close()
        await self._admin_runner.cleanup()
        self.tracing.shutdown()  # exports the spans still buffered

    def _supervise(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a background task for good: an unexpected error is logged, counted, and the
        task started again after a backoff."""
        self._tasks.append(asyncio.create_task(supervise(name, run, self.metrics)))

    async def _open_callback_listener(self) -> None:
        app = callback_app(
            self.settings,
            publisher=self.publisher,
            metrics=self.metrics,
            spool=self.spool,
            auth=self.auth,
            lanes=self.lanes,
            body_limit=self.body_limit,
            tracing=self.tracing,
            verifier=self.verification.verifier if self.verification else None,
        )
        self._callback_runner, site = await open_callback_listener(
            app,
            self.settings,
            metrics=self.metrics,
            ssl_context=self.tls.context if self.tls else None,
            reuse_port=self.worker is not None,
        )
        self.callback_port = site.port
        scheme = "https" if self.tls else "http"
        log.info(
            "serving",
            extra={
                "fields": {
                    "callback": f"{scheme}://{self.settings.host}:{self.callback_port}"
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
        settings = self.settings
        configured = settings.auth_tokens or settings.auth_tokens_file or settings.hmac_secrets
        if not configured and not settings.allow_unauthenticated:
            raise StartupError(
                "no tokens configured: set LUMA_BRIDGE_AUTH_TOKENS (or --auth-tokens) to one "
                "or more secrets (or LUMA_BRIDGE_AUTH_TOKENS_FILE to a file of them), "
                "or LUMA_BRIDGE_ALLOW_UNAUTHENTICATED=true for local experiments"
            )
        if any(len(token) < MIN_TOKEN_LENGTH for token in settings.token_values()):
            log.warning(
                "a token in LUMA_BRIDGE_AUTH_TOKENS is short enough to guess; use "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
                extra={"fields": {"min_length": MIN_TOKEN_LENGTH}},
            )

    async def _drain_orphans(self, directories: list[Path]) -> None:
        """Send the spools of workers that no longer run (`--workers` was lowered)."""
        for directory in directories:
            log.warning(
                "draining the spool of a worker that no longer runs",
                extra={"fields": {"spool_dir": str(directory)}},
            )
            settings = self.settings.model_copy(update={"spool_dir": directory})
            while True:
                try:
                    summary = await drain_spool(settings, within=ORPHAN_DRAIN_SECONDS)
                except KafkaUnavailable:
                    summary = None
                if summary is not None and summary.records_left == 0:
                    retire_spool_dir(directory)
                    log.info("drained", extra={"fields": {"spool_dir": str(directory)}})
                    break
                await asyncio.sleep(CONNECT_RETRY_SECONDS)

    async def _watch_files(self) -> None:
        """Re-read the tokens file and the TLS files when they change."""
        while True:
            await asyncio.sleep(self.settings.file_reload_seconds)
            try:
                if self.auth is not None:
                    self.auth.tokens.reload()
                if self.tls is not None:
                    self.tls.reload()
            except Exception:
                log.exception("reloading the tokens or TLS files failed")

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
        if self.publisher.connected:
            return
        await self._connect_kafka(stopping=asyncio.Event())  # until connected or cancelled
        missing = await missing_topics(self.settings)
        if missing:
            log.error(
                "topics missing; spooled callbacks wait until they exist "
                "(create them with `luma-kafka-bridge topics create`)",
                extra={"fields": {"missing": missing}},
            )
        await self._inspect_topics()
        self.lanes.wakeup.set()

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

    async def _inspect_topics(self) -> None:
        """Read the topics' replication and size configs (never alter them): warn when
        acks=all means one replica, and refuse at the door a body no topic can take."""
        try:
            facts = await inspect_topics(self.settings)
        except Exception as exc:  # the check informs; it must not stop the bridge
            log.info(
                "cannot inspect the topics' configs",
                extra={"fields": {"reason": type(exc).__name__}},
            )
            return
        single = facts.single_replica_topics()
        if single and self.settings.topic_replication_factor < 2:
            # One replica is what these settings ask for (`dev`, a single-broker test
            # cluster): say so, but it is no surprise to warn about.
            log.info(
                "topics with a single replica, as TOPIC_REPLICATION_FACTOR asks",
                extra={"fields": {"topics": single}},
            )
        elif single:
            log.warning(
                "acks=all can be met by a single replica on these topics: an acknowledged "
                "callback is lost if that broker's disk is. Set min.insync.replicas=2 "
                "(and a replication factor of 3) on them, e.g. kafka-configs.sh --alter "
                "--entity-type topics --add-config min.insync.replicas=2",
                extra={"fields": {"topics": single}},
            )
        largest = facts.largest_body()
        if largest is not None:
            size, topic = largest
            self.body_limit.lower_to(
                size, f"body larger than {size} bytes (what topic {topic} can take)"
            )
            if size < self.settings.max_body_bytes:
                log.warning(
                    "a topic's max.message.bytes cannot take a body of MAX_BODY_BYTES: larger "
                    "bodies are refused with 413. Raise max.message.bytes on it, or lower "
                    "LUMA_BRIDGE_MAX_BODY_BYTES",
                    extra={"fields": {"topic": topic, "largest_body": size}},
                )

    async def _watch_kafka(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            reachable = await self.publisher.check_connection(within=HEALTH_CHECK_SECONDS / 2)
            if reachable != self.readiness.kafka_reachable:
                log.warning("Kafka reachable" if reachable else "Kafka unreachable")
            self.readiness.update(kafka_reachable=reachable)
            stalled = reachable and self.lanes.stalled()
            if stalled and not self._stalled:
                log.error(
                    "the spool makes no progress although Kafka answers; /readyz is 503 "
                    "(see the log lines before, and `luma-kafka-bridge spool inspect`)",
                    extra={"fields": {"records": self.spool.records if self.spool else 0}},
                )
            self._stalled = stalled
            self.metrics.spool_stalled.set(1 if stalled else 0)


SUPERVISOR_MAX_BACKOFF = 30.0


async def supervise(
    name: str, run: Callable[[], Coroutine[Any, Any, None]], metrics: Metrics
) -> None:
    """Run `run()` until it returns or is cancelled; restart it after unexpected errors."""
    backoff = 0.5
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "background task failed; restarting it (report this with the log above)",
                extra={"fields": {"task": name, "restart_in_s": backoff}},
            )
            metrics.task_restarts.labels(task=name).inc()
        if time.monotonic() - started > 60:
            backoff = 0.5
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, SUPERVISOR_MAX_BACKOFF)


def _left(deadline: float, *, margin: float) -> float:
    """Seconds until `deadline` less `margin`, never negative."""
    return max(0.0, deadline - margin - time.monotonic())


def build_authenticator(settings: Settings, *, metrics: Metrics | None = None) -> Authenticator:
    """Source allow-list, tokens and signatures as configured; `StartupError` if unreadable."""
    try:
        tokens = TokenAuth(
            settings.token_values(),
            # With signatures and no tokens, the signature is the credential.
            allow_unauthenticated=settings.allow_unauthenticated or bool(settings.hmac_secrets),
            tokens_file=settings.auth_tokens_file,
        )
    except TokenFileError as exc:
        raise StartupError(str(exc)) from None
    signatures = (
        SignatureCheck(
            settings.hmac_keys(),
            tolerance=settings.hmac_tolerance_seconds,
            remembered_ids=settings.hmac_replay_window_size,
            on_early_eviction=metrics.webhook_ids_evicted_early.inc if metrics else None,
        )
        if settings.hmac_secrets
        else None
    )
    sources = SourcePolicy(allowed=settings.allowed_cidrs, trusted_proxies=settings.trusted_proxies)
    return Authenticator(tokens, sources=sources, signatures=signatures)


def build_verification(settings: Settings, metrics: Metrics) -> VerificationService | None:
    """Luma's client and the callback verifier when VERIFY is `tag` or `enforce`."""
    if settings.verify == "off":
        return None
    # Imported only here: Luma's client adds most of a second to start-up, and `off` needs none.
    from bridge.reconcile.verify import VerificationService

    log.info(
        "verifying callbacks with Luma's API",
        extra={
            "fields": {
                "mode": settings.verify,
                "timeout_s": settings.verify_timeout,
                "fallback": settings.verify_fallback,
                "luma_base_url": settings.luma_base_url,
            }
        },
    )
    return VerificationService(settings, metrics=VerificationMetrics(metrics.registry))


async def deadletter_replay(
    settings: Settings,
    *,
    group_id: str | None,
    dry_run: bool,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    """`deadletter replay` with the verifier `serve` would use: a replayed letter is
    written only on the terms a live callback is (with VERIFY `enforce`, never unchecked)."""
    verification = build_verification(settings, Metrics(CollectorRegistry()))
    try:
        return await replay_command(
            settings,
            group_id=group_id,
            dry_run=dry_run,
            as_json=as_json,
            out=out,
            verifier=verification.verifier if verification else None,
        )
    finally:
        if verification is not None:
            await verification.close()


def build_tls(settings: Settings) -> ReloadingTLS | None:
    """The HTTPS context when TLS files are configured; `StartupError` if they do not load."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    try:
        return ReloadingTLS(settings.tls_cert_file, settings.tls_key_file)
    except TLSError as exc:
        raise StartupError(str(exc)) from None


def callback_app(
    settings: Settings,
    *,
    publisher: Publisher,
    metrics: Metrics,
    spool: Spool | None = None,
    auth: Authenticator | None = None,
    lanes: Lanes | None = None,
    body_limit: BodyLimit | None = None,
    tracing: Tracing = TRACING_OFF,
    verifier: CallbackVerifier | None = None,
) -> web.Application:
    """The public application as `serve` runs it, on any publisher.

    `body_limit` is shared with the server, which lowers it when a topic's
    `max.message.bytes` cannot take a body of MAX_BODY_BYTES. `verifier` checks
    callbacks against Luma's API before they are written (VERIFY=tag|enforce).
    """
    pipeline = Pipeline(
        publisher=publisher,
        topics=topics_of(settings),
        metrics=metrics,
        ack_timeout=settings.kafka_ack_timeout,
        lifecycle=settings.lifecycle_topic,
        dedupe=DedupeWindow(size=settings.dedupe_window_size, ttl=settings.dedupe_window_seconds),
        spool=spool,
        lanes=lanes,
        callback_path=settings.callback_path,
        cloudevents=settings.cloudevents_options(),
        tracing=tracing,
        verifier=verifier,
    )
    rate_limiter = (
        RateLimiter(rate=settings.rate_limit_per_second, burst=settings.rate_limit_burst)
        if settings.rate_limit_per_second > 0
        else None
    )
    auth = auth or build_authenticator(settings, metrics=metrics)
    handler = CallbackHandler(
        pipeline=pipeline,
        auth=auth,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        max_inflight=settings.max_inflight_requests,
        body_timeout=settings.body_timeout,
        rate_limiter=rate_limiter,
        body_budget=BodyBudget(settings.max_buffered_body_bytes),
        body_limit=body_limit or BodyLimit(settings.max_body_bytes),
        callback_path=settings.callback_path,
        tracing=tracing,
    )
    app = create_app(
        handler=handler,
        metrics=metrics,
        callback_path=settings.callback_path,
        max_body_bytes=settings.max_body_bytes,
    )
    app[AUTHENTICATOR] = auth
    return app


async def open_callback_listener(
    app: web.Application,
    settings: Settings,
    *,
    metrics: Metrics,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, GuardedSite]:
    """Serve `app` on HOST:PORT with the connection and header limits of `settings`."""
    raise_fd_limit(settings.max_connections)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout)
    await runner.setup()
    guard = ConnectionGuard(
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
        metrics=metrics,
    )
    site = GuardedSite(
        runner,
        settings.host,
        settings.port,
        guard=guard,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        ssl_context=ssl_context,
        reuse_port=reuse_port,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
        ) from None
    return runner, site


async def _open_site(runner: web.AppRunner, host: str, port: int) -> int:
    """Listen on host:port and return the port really bound (for port 0)."""
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound: int = runner.addresses[-1][1]
    return bound


#: Net allocations of container objects between two young-generation collections
#: (CPython's default is 700). The callbacks in flight keep thousands of young objects
#: alive (about 50 each: request, futures, records, headers), so at 700 a collection ran
#: every few callbacks and walked them all each time, only to find them alive, and full
#: collections paused for over 0.1 s. Tuned, the bridge spent 13 % less CPU per callback
#: on Tansu, and its open-loop p99 at half load fell from 253 to 27 ms
#: (docs/performance.md, "The garbage collector"). Cyclic garbage stays bounded: 10,000
#: objects, a few MB.
GC_YOUNG_THRESHOLD = 10_000
GC_OLDER_THRESHOLD = 20


def tune_garbage_collection() -> None:
    """Keep the garbage collector off the callback path once the bridge serves.

    What start-up created (modules, settings, the app, the metrics) lives as long as the
    process: `gc.freeze()` moves it out of every later collection, which then walks only
    what serving created. Refcounting still frees everything that is not in a cycle.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)


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
    settings: Settings,
    *,
    on_serving: Callable[[BridgeServer], None] | None = None,
    exit_when_done: bool = False,
    worker: WorkerRole | None = None,
) -> None:
    """Run the bridge until SIGTERM or SIGINT, then shut down gracefully.

    With `exit_when_done` (the `serve` command), the process ends as soon as the bridge
    is stopped: what is left is the interpreter's teardown of library objects, which a
    busy node can stretch past SHUTDOWN_TIMEOUT.
    """
    stopping = asyncio.Event()
    install_signal_handlers(stopping)
    server = BridgeServer(settings, worker=worker)
    try:
        await server.start(stopping)
        if settings.tune_gc:
            tune_garbage_collection()
        if not stopping.is_set() and on_serving is not None:
            on_serving(server)
        await stopping.wait()
    finally:
        await server.stop()
    # Only after a clean stop: a failed start-up propagates its error (exit code 1).
    await _leave_promptly(exit_when_done)


LEFTOVER_GRACE_SECONDS = 0.5


async def _leave_promptly(exit_now: bool) -> None:
    """After a graceful stop, end what libraries left running, or exit without them.

    aiokafka's tasks may wait on an unresponsive broker long after its producer was
    abandoned, and `asyncio.run` would wait for them: the exit would no longer be
    bounded by SHUTDOWN_TIMEOUT. Everything of ours is closed and fsynced by now.
    """
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    pending: set[asyncio.Task[Any]] = set()
    if leftovers:
        _, pending = await asyncio.wait(leftovers, timeout=LEFTOVER_GRACE_SECONDS)
    if pending:
        log.warning(
            "exiting without waiting for the Kafka client's tasks",
            extra={"fields": {"tasks": len(pending)}},
        )
    if pending or exit_now:
        logging.shutdown()  # flush the log before leaving
        os._exit(0)
