"""The operators' listener, never the public one: /metrics, /healthz, /readyz."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.ops.metrics import Metrics


class Readiness:
    """Whether the bridge should receive traffic.

    Ready when accepting callbacks and able to keep them: Kafka is reachable, or the
    spool can hold them until it is (`spool_has_room`). A Kafka outage alone never makes
    the bridge unready while the spool has room: every replica would go unready at once
    and the load balancer would drop the callbacks. Unready, too, when the spool makes
    no progress although Kafka answers (`spool_stalled`): something only this replica
    or an operator can fix holds its records back.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        spool_has_room: Callable[[], bool] | None = None,
        spool_stalled: Callable[[], bool] | None = None,
    ) -> None:
        self._spool_has_room = spool_has_room or (lambda: False)
        self._spool_stalled = spool_stalled or (lambda: False)
        self.accepting = False
        self.kafka_reachable = False
        metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    @property
    def ready(self) -> bool:
        if not self.accepting:
            return False
        if self.kafka_reachable:
            return not self._spool_stalled()
        return self._spool_has_room()

    def update(self, *, accepting: bool | None = None, kafka_reachable: bool | None = None) -> None:
        if accepting is not None:
            self.accepting = accepting
        if kafka_reachable is not None:
            self.kafka_reachable = kafka_reachable

    def why_not(self) -> str:
        if not self.accepting:
            return "not accepting callbacks (starting or draining)"
        if self.kafka_reachable:
            return (
                "the spool makes no progress although Kafka answers (see the bridge's log "
                "and `luma-kafka-bridge spool inspect`)"
            )
        return "Kafka is not reachable and the spool cannot take callbacks (disabled or full)"


def create_admin_app(metrics: Metrics, readiness: Readiness) -> web.Application:
    """Routes for Prometheus and Kubernetes probes."""

    async def serve_metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": readiness.why_not()}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
