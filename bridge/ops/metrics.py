"""Prometheus metrics, built on an injected registry so two apps never share series.

Every label value comes from a closed set (see `state_label`, `model_label`):
a hostile sender must not be able to create unbounded series.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge import __version__
from bridge.contract.callback import KNOWN_MODELS, KNOWN_STATES

DEADLETTER_REASONS = ("json", "shape", "schema", "encoding", "kafka_refused")
SHED_REASONS = ("inflight_limit", "spool_full", "body_budget")
# The commonest ways Kafka refuses a record for good (others appear when they happen).
REFUSAL_REASONS = ("MessageSizeTooLargeError", "RecordTooLargeError")
BACKGROUND_TASKS = ("drainer", "connect", "kafka_health", "file_reload", "orphan_spools")
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
            "Invalid callbacks written to the dead-letter topic, by reason; kafka_refused: "
            "copies of records Kafka refused for good and the spool quarantined.",
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
        self.resend_lookups = Counter(
            "luma_bridge_resend_lookups",
            "Spooled Kafka records whose earlier send failed without an answer, looked up in "
            "Kafka before being sent again, by outcome: found (already written: removed, not "
            "sent again), absent (sent again), failed (the lookup could not finish: sent again).",
            ["outcome"],
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
        self.webhook_ids_evicted_early = Counter(
            "luma_bridge_webhook_ids_evicted_early",
            "Webhook ids forgotten before their replay window ended, because more signed "
            "requests arrived within it than LUMA_BRIDGE_HMAC_REPLAY_WINDOW_SIZE holds.",
            registry=registry,
        )
        self.log_lines_dropped = Counter(
            "luma_bridge_log_lines_dropped",
            "Log lines dropped because the log writer's queue was full (stderr slower than "
            "the lines logged, or stalled).",
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
        for outcome in RESEND_LOOKUP_OUTCOMES:
            self.resend_lookups.labels(outcome=outcome)
        for task in BACKGROUND_TASKS:
            self.task_restarts.labels(task=task)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)
            self.spool_quarantined.labels(reason=reason)


#: What looking up a record whose send failed without an answer found in Kafka.
RESEND_LOOKUP_OUTCOMES = ("found", "absent", "failed")
#: What a lookup in Luma's API found, the `outcome` label of the reconciler's lookups.
LOOKUP_OUTCOMES = ("unchanged", "repaired", "not_found", "unknown_state", "error")
#: Why the reconciler wrote a record: a generation gone silent, or one Kafka never saw.
REPAIR_KINDS = ("stale", "discovered")
#: The reconciler's calls to Luma's API, and what went wrong with them.
LUMA_ENDPOINTS = ("get", "list")
LUMA_ERROR_REASONS = (
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "unauthorized",
    "not_found",
    "invalid_answer",
    "other",
)
#: How long stuck generations have been silent: upper bounds of the `age` label.
STUCK_AGE_BOUNDS = ((1800, "30m"), (7200, "2h"), (21600, "6h"), (86400, "24h"))
STUCK_AGE_OLDER = "older"
LUMA_API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def stuck_age_label(seconds: float) -> str:
    """The `age` label of a generation silent for `seconds`: the first bound it stays under."""
    for bound, label in STUCK_AGE_BOUNDS:
        if seconds <= bound:
            return label
    return STUCK_AGE_OLDER


class ReconcilerMetrics:
    """The series of `luma-kafka-bridge reconcile`, on an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tracked = Gauge(
            "luma_bridge_reconciler_generations_tracked",
            "Generations in a non-terminal state that this reconciler follows.",
            registry=registry,
        )
        self.stuck = Gauge(
            "luma_bridge_reconciler_stuck_generations",
            "Tracked generations silent longer than RECONCILE_AFTER_SECONDS, by state and "
            "by how long they have been silent (age: at most 30m, 2h, 6h, 24h, or older).",
            ["state", "age"],
            registry=registry,
        )
        self.lookups = Counter(
            "luma_bridge_reconciler_lookups",
            "Generations looked up in Luma's API, by what the lookup found.",
            ["outcome"],
            registry=registry,
        )
        self.records_written = Counter(
            "luma_bridge_reconciler_records_written",
            "States the reconciler wrote because a callback never arrived, by state and kind "
            "(stale: a tracked generation gone silent; discovered: one Kafka never saw).",
            ["state", "kind"],
            registry=registry,
        )
        self.deadletters = Counter(
            "luma_bridge_reconciler_deadletters",
            "Tracked generations Luma's API does not know (404), written to the dead-letter topic.",
            registry=registry,
        )
        self.luma_api_duration = Histogram(
            "luma_bridge_reconciler_luma_api_duration_seconds",
            "Time one request to Luma's API took, by endpoint.",
            ["endpoint"],
            buckets=LUMA_API_BUCKETS,
            registry=registry,
        )
        self.luma_api_errors = Counter(
            "luma_bridge_reconciler_luma_api_errors",
            "Requests to Luma's API that failed, by endpoint and reason.",
            ["endpoint", "reason"],
            registry=registry,
        )
        self.passes = Counter(
            "luma_bridge_reconciler_passes",
            "Reconciliation passes completed.",
            registry=registry,
        )
        self.last_pass = Gauge(
            "luma_bridge_reconciler_last_pass_timestamp_seconds",
            "When the last reconciliation pass completed (Unix time).",
            registry=registry,
        )
        self.ready = Gauge(
            "luma_bridge_reconciler_ready",
            "1 when the reconciler follows the lifecycle topic and Luma accepts its key, else 0.",
            registry=registry,
        )
        self.build_info = Gauge(
            "luma_bridge_reconciler_build_info",
            "Always 1; the version label says which build is running.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version=__version__).set(1)
        for outcome in LOOKUP_OUTCOMES:
            self.lookups.labels(outcome=outcome)
        for state in (*KNOWN_STATES, "other"):
            for kind in REPAIR_KINDS:
                self.records_written.labels(state=state, kind=kind)
        for endpoint in LUMA_ENDPOINTS:
            self.luma_api_duration.labels(endpoint=endpoint)
            for reason in LUMA_ERROR_REASONS:
                self.luma_api_errors.labels(endpoint=endpoint, reason=reason)

    def set_stuck(self, counts: dict[tuple[str, str], int]) -> None:
        """Replace the stuck gauge with `counts` by (state, age): ones no longer stuck read 0."""
        for state in ("queued", "dreaming", "other"):
            for _, age in (*STUCK_AGE_BOUNDS, (0, STUCK_AGE_OLDER)):
                self.stuck.labels(state=state, age=age).set(counts.get((state, age), 0))


class LumaAPISeries(Protocol):
    """The two series a client of Luma's API records into (the reconciler's or the verifier's)."""

    @property
    def luma_api_duration(self) -> Histogram: ...

    @property
    def luma_api_errors(self) -> Counter: ...


#: `luma_bridge_verifications_total`'s results: the values of the `luma-verified` header.
VERIFICATION_RESULTS = ("true", "false", "unknown")
#: Why each result was reached. `confirmed` and `cached`: Luma's API reports this state or a
#: later one (fetched now, or within the cache's lifetime); `not_found`, `state_ahead`,
#: `state_differs`, `assets_differ`: refused by `enforce`; `unknown_state`: a state the bridge
#: cannot compare; `timeout`, `throttled` (the bridge's own limit toward Luma), `api_error`,
#: `key_refused`: Luma's API did not answer usefully in time.
VERIFICATION_REASONS = {
    "true": ("confirmed", "cached"),
    "false": ("not_found", "state_ahead", "state_differs", "assets_differ"),
    "unknown": ("unknown_state", "timeout", "throttled", "api_error", "key_refused"),
}
# Verification happens within Luma's 5 s: dense below a second.
VERIFY_API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)


class VerificationMetrics:
    """The series of callback verification (`LUMA_BRIDGE_VERIFY=tag|enforce`), on the bridge's
    registry. Created only when verification is on, so `off` exports none of them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.verifications = Counter(
            "luma_bridge_verifications",
            "Callbacks checked against Luma's API, by result (the luma-verified header) and "
            "reason.",
            ["result", "reason"],
            registry=registry,
        )
        self.luma_api_duration = Histogram(
            "luma_bridge_verify_luma_api_duration_seconds",
            "Time one request to Luma's API took while verifying a callback, by endpoint.",
            ["endpoint"],
            buckets=VERIFY_API_BUCKETS,
            registry=registry,
        )
        self.luma_api_errors = Counter(
            "luma_bridge_verify_luma_api_errors",
            "Requests to Luma's API made while verifying a callback that failed, by endpoint "
            "and reason.",
            ["endpoint", "reason"],
            registry=registry,
        )
        for result, reasons in VERIFICATION_REASONS.items():
            for reason in reasons:
                self.verifications.labels(result=result, reason=reason)
        self.luma_api_duration.labels(endpoint="get")
        for reason in LUMA_ERROR_REASONS:
            self.luma_api_errors.labels(endpoint="get", reason=reason)
