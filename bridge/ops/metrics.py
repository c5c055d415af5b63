"""Prometheus metrics, built on an injected registry so two apps never share series.

Every label value comes from a closed set (see `state_label`, `model_label`):
a hostile sender must not be able to create unbounded series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge import __version__
from bridge.contract.callback import KNOWN_MODELS, KNOWN_STATES

DEADLETTER_REASONS = ("json", "shape", "schema")
SHED_REASONS = ("inflight_limit", "spool_full")
# The commonest ways Kafka refuses a record for good (others appear when they happen).
REFUSAL_REASONS = ("MessageSizeTooLargeError", "RecordTooLargeError")
BACKGROUND_TASKS = ("drainer", "connect", "kafka_health", "file_reload")
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
        # The spool's series all count Kafka records (a callback is one record per topic
        # it is written to: its state topic and, when on, the lifecycle topic).
        self.spool_records = Gauge(
            "luma_bridge_spool_records",
            "Kafka records held in the local spool, waiting for Kafka.",
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "luma_bridge_spool_bytes",
            "Bytes the local spool takes on disk (live database pages plus the WAL), "
            "the measure SPOOL_MAX_BYTES bounds.",
            registry=registry,
        )
        self.spool_oldest_age = Gauge(
            "luma_bridge_spool_oldest_age_seconds",
            "Age of the oldest record in the spool (0 when empty).",
            registry=registry,
        )
        self.spooled = Counter(
            "luma_bridge_spooled_records",
            "Kafka records written to the spool (not acknowledged in time, or queued "
            "behind an earlier record of the same generation).",
            registry=registry,
        )
        self.spool_drained = Counter(
            "luma_bridge_spool_drained_records",
            "Spooled Kafka records acknowledged by Kafka and removed from the spool.",
            registry=registry,
        )
        self.late_acknowledgements = Counter(
            "luma_bridge_late_acknowledgements",
            "Kafka records acknowledged after they were spooled: removed, not sent again.",
            registry=registry,
        )
        self.spool_quarantined = Counter(
            "luma_bridge_spool_quarantined_records",
            "Spooled Kafka records Kafka refused for good, moved to the spool's quarantine, "
            "by reason (the Kafka error).",
            ["reason"],
            registry=registry,
        )
        self.spool_quarantine_records = Gauge(
            "luma_bridge_spool_quarantine_records",
            "Kafka records held in the spool's quarantine (see `spool inspect`).",
            registry=registry,
        )
        self.spool_send_failures = Counter(
            "luma_bridge_spool_send_failures",
            "Sends of spooled records that failed, by kind: retry (outage), topic "
            "(authorization, unknown topic), producer (renewed).",
            ["kind"],
            registry=registry,
        )
        self.spool_write_errors = Counter(
            "luma_bridge_spool_write_errors",
            "Spool writes or deletes SQLite refused (a full disk, an I/O error).",
            registry=registry,
        )
        self.spool_stalled = Gauge(
            "luma_bridge_spool_stalled",
            "1 when spooled records made no progress for SPOOL_STALL_SECONDS while Kafka "
            "answers (then /readyz is 503), else 0.",
            registry=registry,
        )
        self.refused = Counter(
            "luma_bridge_kafka_refused_records",
            "Callbacks answered 413 because Kafka refuses their records for good, by reason.",
            ["reason"],
            registry=registry,
        )
        self.producer_renewals = Counter(
            "luma_bridge_kafka_producer_renewals",
            "Kafka producers replaced after an error that left them unusable.",
            registry=registry,
        )
        self.task_restarts = Counter(
            "luma_bridge_task_restarts",
            "Background tasks restarted after an unexpected error, by task.",
            ["task"],
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
        for kind in ("retry", "topic", "producer"):
            self.spool_send_failures.labels(kind=kind)
        for task in BACKGROUND_TASKS:
            self.task_restarts.labels(task=task)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)
            self.spool_quarantined.labels(reason=reason)
