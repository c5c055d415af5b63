"""The one settings object: read from `LUMA_BRIDGE_*` variables, overridable by CLI flags.

This is the only module that reads the environment. Everything else receives a
`Settings` instance, built once at start-up, so a bad value stops the process
before the first callback instead of failing one later.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Any, Literal

from aiokafka.helpers import create_ssl_context
from pydantic import (
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bridge.contract.callback import (
    DEFAULT_BOOTSTRAP_SERVERS,
    DEFAULT_CALLBACK_PATH,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLOUDEVENTS_SOURCE,
    DEFAULT_TOPIC_PREFIX,
    CloudEvents,
)

ENV_PREFIX = "LUMA_BRIDGE_"
#: Luma's production Dream Machine API (what the official SDK uses by default).
LUMA_API_BASE_URL = "https://api.lumalabs.ai/dream-machine/v1"

CompressionType = Literal["none", "gzip", "snappy", "lz4", "zstd"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogFormat = Literal["auto", "json", "text"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
VerifyMode = Literal["off", "tag", "enforce"]
VerifyFallback = Literal["reject", "accept"]
#: Luma gives up on a callback not answered within 5 s.
LUMA_CALLBACK_DEADLINE = 5.0

# Standard Webhooks secrets: `whsec_` and the base64 of 24 to 64 random bytes.
HMAC_SECRET_PREFIX = "whsec_"  # noqa: S105 - a format marker, not a secret
HMAC_SECRET_BYTES = (24, 64)
# Shorter tokens are warned about at start-up (guessable); generate 32 random bytes.
MIN_TOKEN_LENGTH = 16


def _split_commas(value: Any) -> Any:
    """Accept `a,b,c` from the environment or the command line as a list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _split_pairs(value: Any) -> Any:
    """Accept `key=value,key=value` as a mapping (topic configs)."""
    if not isinstance(value, str):
        return value
    pairs: dict[str, str] = {}
    for item in _split_commas(value):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value pairs separated by commas, got {item!r}")
        pairs[key.strip()] = val.strip()
    return pairs


class Settings(BaseSettings):
    """Everything the bridge can be told. Field names map to `LUMA_BRIDGE_<NAME>`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    # HTTP edge
    host: str = Field("0.0.0.0", description="Address the callback listener binds to.")  # noqa: S104 - a server must listen on all interfaces in a pod
    port: int = Field(8080, ge=0, le=65535, description="Port of the public callback listener.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes of `serve` sharing the callback port (SO_REUSEPORT), each "
        "with its own spool under SPOOL_DIR; keep 1 in Kubernetes and run more pods.",
    )
    tune_gc: bool = Field(
        True,
        description="Once serving, freeze what start-up made and collect young objects every "
        "10,000 allocations instead of CPython's 700 (docs/performance.md); false keeps "
        "CPython's defaults.",
    )
    admin_port: int = Field(
        8081,
        ge=0,
        le=65535,
        description="Port of the operator listener (/metrics, /healthz, /readyz).",
    )
    callback_path: str = Field(
        DEFAULT_CALLBACK_PATH,
        description="Path Luma POSTs callbacks to; the token follows it (and is redacted "
        "from request.callback_url before a record is written).",
    )
    auth_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (),
        description="Comma-separated accepted tokens (several allow rotation).",
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve without any token. Only for local experiments."
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest callback body accepted, in bytes."
    )

    # Access control beyond the token (see docs/security.md)
    auth_tokens_file: Path | None = Field(
        None,
        description="File of accepted tokens (one per line or comma-separated), re-read "
        "when it changes: rotation without a restart. Adds to AUTH_TOKENS.",
    )
    allowed_cidrs: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = Field(
        (),
        description="Comma-separated networks callbacks may come from (empty: any source).",
    )
    trusted_proxies: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = Field(
        (),
        description="Comma-separated networks of proxies whose X-Forwarded-For is believed "
        "(empty: never believed).",
    )
    hmac_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (),
        description="Comma-separated Standard Webhooks secrets (whsec_...); when set, every "
        "callback must carry a valid webhook-signature.",
    )
    hmac_tolerance_seconds: int = Field(
        300,
        ge=1,
        le=3600,
        description="How far webhook-timestamp may be from now; a webhook-id is refused "
        "twice within it.",
    )
    hmac_replay_window_size: int = Field(
        100_000,
        ge=1,
        description="Webhook ids remembered (about 300 bytes each) to tell a sender's retry "
        "from a reused id; more within the window are forgotten early (a metric counts them).",
    )
    file_reload_seconds: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How often AUTH_TOKENS_FILE and the TLS files are checked for changes.",
    )

    # Limits on what a client may send or hold
    max_header_bytes: int = Field(
        8190,
        ge=1024,
        le=65536,
        description="Longest request line or header line, in bytes; beyond it, 431.",
    )
    max_headers: int = Field(
        64, ge=8, le=1024, description="Most header fields in one request; beyond it, 431."
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds a connection may take to send a request's headers (from "
        "connecting, or from the previous answer); then it is closed.",
    )
    body_timeout: float = Field(
        10.0, gt=0, le=300, description="Seconds to receive a whole body; then 408."
    )
    max_buffered_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Request body bytes held in memory at once, across all requests; "
        "beyond it, 503. At least MAX_BODY_BYTES.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Open connections on the callback port; beyond it the longest-idle one "
        "is closed, or the new one answered 503.",
    )
    rate_limit_per_second: float = Field(
        0.0,
        ge=0,
        description="Requests per second from one source address; beyond it, 429 (0: off).",
    )
    rate_limit_burst: int = Field(
        20, ge=1, description="Requests one source may send at once above its rate."
    )

    # Direct HTTPS
    tls_cert_file: Path | None = Field(
        None,
        description="Certificate chain (PEM) for HTTPS on the callback port; reloaded "
        "when it changes. Needs TLS_KEY_FILE.",
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) for TLS_CERT_FILE.")

    # Kafka
    kafka_bootstrap_servers: str = Field(
        DEFAULT_BOOTSTRAP_SERVERS,
        min_length=1,
        description="Comma-separated host:port of Kafka brokers.",
    )
    kafka_ack_timeout: float = Field(
        4.0,
        gt=0,
        lt=5,
        description="Seconds to wait for Kafka's acknowledgement before answering 503 "
        "(below Luma's 5 s timeout).",
    )
    kafka_client_id: str = Field(DEFAULT_CLIENT_ID, description="Kafka client id.")
    kafka_enable_idempotence: bool = Field(
        True, description="Idempotent producer. Turn off only for brokers without it."
    )
    kafka_compression_type: CompressionType = Field(
        "none", description="Producer compression codec."
    )
    kafka_linger_ms: int = Field(0, ge=0, le=1000, description="Producer linger, in ms.")
    kafka_max_batch_size: int = Field(
        65536, ge=1024, description="Producer batch size per partition, in bytes."
    )
    kafka_request_timeout_ms: int = Field(
        30000, ge=1000, description="Producer request timeout, in ms."
    )
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    kafka_sasl_mechanism: SaslMechanism | None = Field(None, description="SASL mechanism.")
    kafka_sasl_username: str | None = Field(None, description="SASL username.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle for Kafka TLS.")
    kafka_ssl_certfile: Path | None = Field(None, description="Client certificate for Kafka mTLS.")
    kafka_ssl_keyfile: Path | None = Field(None, description="Client key for Kafka mTLS.")

    # Topics
    topic_prefix: str = Field(
        DEFAULT_TOPIC_PREFIX,
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="Prefix of every topic the bridge writes.",
    )
    lifecycle_topic: bool = Field(
        True, description="Also write every accepted callback to {prefix}.lifecycle."
    )
    topic_partitions: int = Field(6, ge=1, description="Partitions per topic for `topics create`.")
    topic_replication_factor: int = Field(
        3, ge=1, description="Replication factor for `topics create`."
    )
    topic_min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="min.insync.replicas for `topics create` (default: the smaller of 2 and "
        "TOPIC_REPLICATION_FACTOR); TOPIC_CONFIGS wins.",
    )
    topic_configs: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Topic configs for `topics create`, as key=value,key=value.",
    )
    check_topics: bool = Field(
        True, description="At start-up, stop if a topic the bridge writes is missing."
    )

    # CloudEvents (Kafka protocol binding, binary content mode)
    cloudevents: bool = Field(
        True,
        description="Write CloudEvents ce_* headers on every generation record (binary mode).",
    )
    cloudevents_source: str = Field(
        DEFAULT_CLOUDEVENTS_SOURCE,
        min_length=1,
        pattern=r"^\S+$",
        description="The ce_source attribute: a URI reference naming where events come from.",
    )

    # Durability and flow control
    max_inflight_requests: int = Field(
        1024, ge=1, description="Callbacks handled at once; beyond it, 503 at once."
    )
    dedupe_window_size: int = Field(
        100_000, ge=0, description="Event ids remembered to answer redeliveries (0: off)."
    )
    dedupe_window_seconds: float = Field(
        600.0, gt=0, description="How long an acknowledged event id is remembered."
    )
    spool_enabled: bool = Field(
        True, description="Keep callbacks Kafka did not acknowledge in time in a local spool."
    )
    spool_dir: Path = Field(
        Path("./spool"), description="Directory of the local write-ahead spool."
    )
    spool_max_bytes: int = Field(
        1024**3,
        ge=1024 * 1024,
        description="Bytes the spool may take on disk (database and WAL); when full, 503.",
    )
    spool_stall_seconds: float = Field(
        120.0,
        gt=0,
        description="Seconds spooled records may make no progress while Kafka answers "
        "before /readyz turns 503.",
    )

    # Lifecycle
    drain_delay: float = Field(
        5.0,
        ge=0,
        description="Seconds to keep serving after SIGTERM while /readyz says 503, "
        "so load balancers stop sending first.",
    )
    shutdown_timeout: float = Field(
        25.0,
        gt=0,
        description="Seconds from SIGTERM to exit, drain delay included (the "
        "reconciler's: to save its state and leave its group).",
    )

    # The reconciler (`luma-kafka-bridge reconcile`; see docs/reconcile.md)
    luma_api_key: SecretStr | None = Field(
        None,
        description="Luma API key the reconciler and callback verification read generations "
        "with (required by `reconcile` and by VERIFY=tag|enforce; never logged).",
    )
    luma_base_url: str = Field(
        LUMA_API_BASE_URL,
        pattern=r"^https?://",
        description="Base URL of Luma's Dream Machine API.",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="The public callback URL without the token (e.g. "
        "https://bridge.example.com/luma/callback): generations whose callback_url starts "
        "with it are this bridge's. Without it the reconciler discovers nothing.",
    )
    reconcile_discover: bool = Field(
        True,
        description="Page through Luma's generations list for generations Kafka never saw "
        "(needs PUBLIC_URL).",
    )
    reconcile_after_seconds: float = Field(
        600.0,
        gt=0,
        description="A generation silent this long in a non-terminal state is looked up in "
        "Luma's API; discovery leaves younger generations alone.",
    )
    reconcile_lookback_seconds: float = Field(
        86400.0, gt=0, description="How far back discovery looks, by created_at."
    )
    reconcile_interval_seconds: float = Field(
        60.0, gt=0, description="Seconds between two reconciliation passes."
    )
    reconcile_group_id: str | None = Field(
        None,
        min_length=1,
        description="Consumer group of the reconcilers (default: KAFKA_CLIENT_ID-reconciler).",
    )
    luma_api_rate_limit: float = Field(
        5.0, gt=0, description="Requests per second the reconciler sends to Luma's API at most."
    )
    luma_api_timeout: float = Field(
        10.0, gt=0, le=120, description="Seconds one request to Luma's API may take."
    )
    luma_api_max_backoff: float = Field(
        60.0,
        gt=0,
        description="Longest wait after a 429 or 5xx from Luma's API (Retry-After is "
        "honoured up to this).",
    )

    # Verifying callbacks against Luma's API (see docs/security.md)
    verify: VerifyMode = Field(
        "off",
        description="Check each callback's generation with Luma's API: off; tag (add the "
        "record header luma-verified: true|false|unknown, never change the answer); enforce "
        "(refuse with 401 what Luma's API does not confirm; needs `reconcile` running). Needs "
        "LUMA_API_KEY.",
    )
    verify_timeout: float = Field(
        1.0,
        gt=0,
        lt=LUMA_CALLBACK_DEADLINE,
        description="Seconds verification may take per callback, re-check included; plus "
        "KAFKA_ACK_TIMEOUT it must stay below Luma's 5 s.",
    )
    verify_fallback: VerifyFallback = Field(
        "reject",
        description="With VERIFY=enforce, when Luma's API does not answer in time: reject "
        "(503, Luma retries) or accept (written with luma-verified: unknown).",
    )
    verify_rate_limit: float = Field(
        20.0,
        gt=0,
        description="Lookups per second verification sends to Luma's API at most (bursts of "
        "as many); beyond it a callback counts as not verifiable in time.",
    )

    # Operations
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING or ERROR, in any case.")
    log_format: LogFormat = Field(
        "auto", description="json, text, or auto (text on a terminal, else json)."
    )

    @field_validator(
        "auth_tokens", "allowed_cidrs", "trusted_proxies", "hmac_secrets", mode="before"
    )
    @classmethod
    def _lists_from_commas(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("hmac_secrets")
    @classmethod
    def _hmac_secrets_are_standard(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for secret in value:
            hmac_key(secret)  # raises a ValueError that never quotes the secret
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_in_any_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("topic_configs", mode="before")
    @classmethod
    def _configs_from_pairs(cls, value: Any) -> Any:
        return _split_pairs(value)

    @field_validator("callback_path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or "{" in value:
            raise ValueError("must start with '/', not end with '/', and hold no '{'")
        return value

    @model_validator(mode="after")
    def _sasl_is_complete(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "SASL needs KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        return self

    @model_validator(mode="after")
    def _min_insync_fits_the_replicas(self) -> Settings:
        wanted = self.topic_min_insync_replicas
        if wanted is not None and wanted > self.topic_replication_factor:
            raise ValueError(
                f"{env_name('topic_min_insync_replicas')} must not exceed "
                f"{env_name('topic_replication_factor')}: acks=all could never be met"
            )
        return self

    @model_validator(mode="after")
    def _body_budget_holds_a_body(self) -> Settings:
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"{env_name('max_buffered_body_bytes')} must be at least "
                f"{env_name('max_body_bytes')}, or no body that large could ever be read"
            )
        return self

    @model_validator(mode="after")
    def _tls_is_complete(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"HTTPS needs both {env_name('tls_cert_file')} and {env_name('tls_key_file')}"
            )
        return self

    @model_validator(mode="after")
    def _verification_can_work(self) -> Settings:
        if self.verify == "off":
            return self
        if self.luma_api_key is None or not self.luma_api_key.get_secret_value():
            raise ValueError(
                f"{env_name('verify')}={self.verify} needs {env_name('luma_api_key')}: set it "
                "to a Luma API key that can read this account's generations, or set "
                f"{env_name('verify')}=off"
            )
        total = self.verify_timeout + self.kafka_ack_timeout
        if total >= LUMA_CALLBACK_DEADLINE:
            raise ValueError(
                f"{env_name('verify_timeout')} ({self.verify_timeout:g} s) plus "
                f"{env_name('kafka_ack_timeout')} ({self.kafka_ack_timeout:g} s) is {total:g} s; "
                f"Luma gives up after {LUMA_CALLBACK_DEADLINE:g} s: lower one of them so the sum "
                f"stays below it (e.g. {env_name('kafka_ack_timeout')}=3)"
            )
        return self

    def token_values(self) -> tuple[bytes, ...]:
        """The accepted tokens as bytes, for constant-time comparison."""
        return tuple(token.get_secret_value().encode() for token in self.auth_tokens)

    def cloudevents_options(self) -> CloudEvents:
        """The CloudEvents attributes records carry, as the contract's headers take them."""
        return CloudEvents(enabled=self.cloudevents, source=self.cloudevents_source)

    def hmac_keys(self) -> tuple[bytes, ...]:
        """The HMAC keys (decoded Standard Webhooks secrets)."""
        return tuple(hmac_key(secret) for secret in self.hmac_secrets)


def hmac_key(secret: SecretStr) -> bytes:
    """The key of a `whsec_<base64>` secret; the ValueError never quotes the secret."""
    text = secret.get_secret_value()
    low, high = HMAC_SECRET_BYTES
    problem = f"each secret must be {HMAC_SECRET_PREFIX} followed by the base64 of {low} to "
    problem += f"{high} bytes"
    if not text.startswith(HMAC_SECRET_PREFIX):
        raise ValueError(problem)
    try:
        key = base64.b64decode(text[len(HMAC_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(problem) from None
    if not low <= len(key) <= high:
        raise ValueError(problem)
    return key


def security_options(settings: Settings) -> dict[str, Any]:
    """TLS and SASL keyword arguments shared by every aiokafka client the bridge makes."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
    if settings.kafka_sasl_mechanism:
        password = settings.kafka_sasl_password
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def consumer_options(settings: Settings, role: str) -> dict[str, Any]:
    """What every aiokafka consumer the bridge makes shares: the cluster, a client id
    naming its `role`, offsets committed by hand, the request timeout, TLS and SASL."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"{settings.kafka_client_id}-{role}",
        "enable_auto_commit": False,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        **security_options(settings),
    }


class SettingsError(Exception):
    """A setting has a bad value; the message names it and never echoes a value."""


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return f"{ENV_PREFIX}{field.upper()}"


def flag_name(field: str) -> str:
    """The CLI flag that overrides `field`."""
    return "--" + field.replace("_", "-")


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment and `overrides`, or raise one clear `SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, naming its variable and flag; input values are left out."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        where = f"{env_name(field)} ({flag_name(field)})" if field else "settings"
        lines.append(f"invalid {where}: {error['msg']}")
    return "; ".join(lines)


class EmbeddedBrokerSettings(BaseSettings):
    """Where to find the embedded broker binary (`TANSU_BIN`), for `dev` and the tests."""

    model_config = SettingsConfigDict(frozen=True)

    tansu_bin: Path | None = None


class DevStateSettings(BaseSettings):
    """Where `dev` keeps the state the other commands read (`XDG_STATE_HOME`, the XDG default)."""

    model_config = SettingsConfigDict(frozen=True)

    xdg_state_home: Path | None = None


class OtelSettings(BaseSettings):
    """The standard OpenTelemetry variables that decide whether traces are exported.

    The SDK reads the rest of `OTEL_*` itself (service name, sampler, exporter options).
    """

    model_config = SettingsConfigDict(frozen=True)

    otel_exporter_otlp_endpoint: str | None = None
    otel_traces_exporter: str | None = None
