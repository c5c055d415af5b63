"""Prometheus metrics, built on an injected registry so two apps never share series.

Every label value comes from a closed set (see `state_label`, `model_label`):
a hostile sender must not be able to create unbounded series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge import __version__
from bridge.contract.callback import KNOWN_MODELS, KNOWN_STATES

DEADLETTER_REASONS = ("json", "shape", "schema", "encoding")
SHED_REASONS = ("inflight_limit", "spool_full", "body_budget")
OUTCOMES = ("accepted", "duplicate", "invalid", "unauthorized", "rejected", "unavailable")

# 1 ms to 5 s (Luma's timeout), dense where answers normally land.
CALLBACK_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
)
PRODUCE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    4.0,
    10.0,
)
# A generation takes seconds (queued) to many minutes (completed).
AGE_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600, 86400)


def state_label(state: str | None) -> str:
    """A known state as itself, anything else as `other`, no state as `none`."""
    if state is None:
        return "none"
    return state if state in KNOWN_STATES else "other"


def model_label(model: str | None) -> str:
    """A known model as itself, anything else as `other`, no model as `none`."""
    if model is None:
        return "none"
    return model if model in KNOWN_MODELS else "other"


class Metrics:
    """All of the bridge's series. Construct one per process (or per test) with its registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.callbacks = Counter(
            "luma_bridge_callbacks",
            "Callbacks answered, by generation state and outcome.",
            ["state", "outcome"],
            registry=registry,
        )
        self.callback_duration = Histogram(
            "luma_bridge_callback_duration_seconds",
            "Time from receiving a callback to answering it, by outcome.",
            ["outcome"],
            buckets=CALLBACK_BUCKETS,
            registry=registry,
        )
        self.produce_duration = Histogram(
            "luma_bridge_kafka_produce_duration_seconds",
            "Time from handing a record to the producer to the broker's acknowledgement.",
            ["topic"],
            buckets=PRODUCE_BUCKETS,
            registry=registry,
        )
        self.produce_errors = Counter(
            "luma_bridge_kafka_produce_errors",
            "Records Kafka did not acknowledge, by reason.",
            ["reason"],
            registry=registry,
        )
        self.produce_retries = Counter(
            "luma_bridge_kafka_produce_retries",
            "Produce requests the Kafka producer retried after a retriable error.",
            registry=registry,
        )
        self.duplicate_deliveries = Counter(
            "luma_bridge_duplicate_deliveries",
            "Callbacks whose luma-event-id was seen within the window: the sender's retries.",
            ["state"],
            registry=registry,
        )
        self.inflight = Gauge(
            "luma_bridge_inflight_requests",
            "Callbacks being handled right now.",
            registry=registry,
        )
        self.deadletters = Counter(
            "luma_bridge_deadletters",
            "Invalid callbacks written to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.generation_age = Histogram(
            "luma_bridge_generation_age_seconds",
            "Callback receipt time minus the generation's created_at, by state and model.",
            ["state", "model"],
            buckets=AGE_BUCKETS,
            registry=registry,
        )
        self.build_info = Gauge(
            "luma_bridge_build_info",
            "Always 1; the version label says which build is running.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version=__version__).set(1)
        self.ready = Gauge(
            "luma_bridge_ready",
            "1 when the bridge accepts callbacks and its producer is connected, else 0.",
            registry=registry,
        )
        self.phase = Gauge(
            "luma_bridge_lifecycle_phase",
            "0 starting, 1 serving, 2 draining (readyz 503, still answering), 3 stopping.",
            registry=registry,
        )
        self.shed = Counter(
            "luma_bridge_shed",
            "Callbacks answered 503 at once instead of being queued, by reason.",
            ["reason"],
            registry=registry,
        )
        self.spool_records = Gauge(
            "luma_bridge_spool_records",
            "Callbacks held in the local spool, waiting for Kafka.",
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "luma_bridge_spool_bytes",
            "Bytes of records held in the local spool.",
            registry=registry,
        )
        self.spool_oldest_age = Gauge(
            "luma_bridge_spool_oldest_age_seconds",
            "Age of the oldest record in the spool (0 when empty).",
            registry=registry,
        )
        self.spooled = Counter(
            "luma_bridge_spooled",
            "Callbacks written to the spool because Kafka did not acknowledge in time.",
            registry=registry,
        )
        self.spool_drained = Counter(
            "luma_bridge_spool_drained",
            "Spooled callbacks later acknowledged by Kafka and removed from the spool.",
            registry=registry,
        )
        self.webhook_ids_evicted_early = Counter(
            "luma_bridge_webhook_ids_evicted_early",
            "Webhook ids forgotten before their replay window ended, because more signed "
            "requests arrived within it than LUMA_BRIDGE_HMAC_REPLAY_WINDOW_SIZE holds.",
            registry=registry,
        )
        self._callback_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._pre_create_series()

    def observe_callback(self, state: str, outcome: str, seconds: float) -> None:
        """Count one answered callback and its answer time (labelled children cached)."""
        children = self._callback_children.get((state, outcome))
        if children is None:
            children = (
                self.callbacks.labels(state=state, outcome=outcome),
                self.callback_duration.labels(outcome=outcome),
            )
            self._callback_children[(state, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def _pre_create_series(self) -> None:
        """Export zeros for every label combination, so rates and alerts have data from start."""
        for outcome in OUTCOMES:
            self.callback_duration.labels(outcome=outcome)
            for state in (*KNOWN_STATES, "other", "none"):
                self.callbacks.labels(state=state, outcome=outcome)
        for state in (*KNOWN_STATES, "other"):
            self.duplicate_deliveries.labels(state=state)
        for reason in SHED_REASONS:
            self.shed.labels(reason=reason)
        # The first increment of a series Prometheus has never seen is invisible to rate():
        # export the reasons that matter to alerts from the start.
        for reason in DEADLETTER_REASONS:
            self.deadletters.labels(reason=reason)
        for reason in ("timeout", "not_connected"):
            self.produce_errors.labels(reason=reason)
