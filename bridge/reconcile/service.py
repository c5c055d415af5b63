"""Running the reconciler: start-up, the main loop and shutdown, with its own probes.

`luma-kafka-bridge reconcile` runs `ReconcilerService`: the admin listener
(`ADMIN_PORT`: `/metrics`, `/healthz`, `/readyz`), the Luma client, and the
`Reconciler` in its consumer group. The first SIGTERM or SIGINT saves the state and
leaves the group; a second one exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bridge.ops.metrics import ReconcilerMetrics
from bridge.reconcile.luma import LumaClient
from bridge.reconcile.reconciler import Reconciler, ReconcilerError, group_id
from bridge.settings import Settings, SettingsError, env_name

log = logging.getLogger("bridge.reconcile")


def require_api_key(settings: Settings) -> None:
    """`reconcile` cannot read Luma's API without a key: fail at boot, naming the variable."""
    if settings.luma_api_key is None or not settings.luma_api_key.get_secret_value():
        raise SettingsError(
            f"{env_name('luma_api_key')} is required by `reconcile`: set it to a Luma API key "
            "(https://lumalabs.ai/dream-machine/api/keys) that can read this account's generations"
        )


class ReconcilerService:
    """The reconciler process: probes, metrics, the Luma client and the `Reconciler`."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        require_api_key(settings)
        assert settings.luma_api_key is not None
        self.settings = settings
        self.metrics = ReconcilerMetrics(registry or CollectorRegistry())
        self.luma = LumaClient(
            api_key=settings.luma_api_key,
            base_url=settings.luma_base_url,
            timeout=settings.luma_api_timeout,
            rate_limit=settings.luma_api_rate_limit,
            max_backoff=settings.luma_api_max_backoff,
            metrics=self.metrics,
        )
        self.reconciler = Reconciler(settings, luma=self.luma, metrics=self.metrics)
        self._admin = web.AppRunner(self._admin_app(), access_log=None)
        self.admin_port = 0
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    @property
    def ready(self) -> bool:
        return self.reconciler.started and not self.reconciler.key_rejected

    @property
    def alive(self) -> bool:
        """The main loop went round recently (a pass may take up to an interval)."""
        allowed = max(300.0, 3 * self.settings.reconcile_interval_seconds)
        return time.monotonic() - self.reconciler.last_tick < allowed

    async def start(self) -> None:
        """Open the admin listener and join the group; `ReconcilerError` says what is wrong."""
        await self._admin.setup()
        site = web.TCPSite(self._admin, self.settings.host, self.settings.admin_port)
        try:
            await site.start()
        except OSError as exc:
            raise ReconcilerError(
                f"cannot listen on {self.settings.host}:{self.settings.admin_port}: {exc.strerror}"
            ) from None
        self.admin_port = self._admin.addresses[-1][1]
        try:
            await self.reconciler.start()
        except KafkaError as exc:
            raise ReconcilerError(
                f"cannot reach Kafka at {self.settings.kafka_bootstrap_servers} "
                f"({type(exc).__name__}): check LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS and that the "
                "brokers are up"
            ) from None
        self._announce()

    async def stop(self) -> None:
        """Save the state, leave the group, close everything. Safe to call twice."""
        await self.reconciler.stop()
        await self.luma.close()
        await self._admin.cleanup()

    def _announce(self) -> None:
        settings = self.settings
        log.info(
            "reconciling",
            extra={
                "fields": {
                    "lifecycle": self.reconciler.topics.lifecycle,
                    "group": group_id(settings),
                    "luma_api": settings.luma_base_url,
                    "after_s": settings.reconcile_after_seconds,
                    "interval_s": settings.reconcile_interval_seconds,
                    "admin": f"http://{settings.host}:{self.admin_port}",
                }
            },
        )
        if self.reconciler.discovering:
            log.info(
                "discovery on: generations whose callback_url starts with PUBLIC_URL",
                extra={
                    "fields": {
                        "public_url": settings.public_url,
                        "lookback_s": settings.reconcile_lookback_seconds,
                    }
                },
            )
        elif settings.reconcile_discover:
            log.warning(
                "discovery off: LUMA_BRIDGE_PUBLIC_URL is not set, so generations whose every "
                "callback was lost are not found; set it to the public callback URL without "
                "the token (e.g. https://bridge.example.com/luma/callback)"
            )
        else:
            log.info("discovery off (LUMA_BRIDGE_RECONCILE_DISCOVER=false)")

    def _admin_app(self) -> web.Application:
        async def serve_metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        async def healthz(_: web.Request) -> web.Response:
            if self.alive:
                return web.json_response({"status": "alive"})
            return web.json_response({"status": "stalled"}, status=503)

        async def readyz(_: web.Request) -> web.Response:
            if self.ready:
                return web.json_response({"status": "ready"})
            reason = (
                "Luma's API refused the API key"
                if self.reconciler.key_rejected
                else "not following the lifecycle topic (starting or stopping)"
            )
            return web.json_response({"status": "not ready", "reason": reason}, status=503)

        app = web.Application()
        app.router.add_get("/metrics", serve_metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app


def _install_signal_handlers(stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second signal: exiting without saving the state")
            os._exit(128 + signum)
        log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def reconcile(
    settings: Settings, *, on_running: Callable[[ReconcilerService], None] | None = None
) -> None:
    """Run the reconciler until SIGTERM or SIGINT."""
    stopping = asyncio.Event()
    _install_signal_handlers(stopping)
    service = ReconcilerService(settings)
    try:
        await service.start()
        if on_running is not None:
            on_running(service)
        await service.reconciler.run(stopping)
    finally:
        await service.stop()
