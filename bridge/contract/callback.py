"""What a callback is and what record it becomes: validation, event id, topics, headers.

Pure functions only, no I/O, so the whole contract is testable without a network.
The record value is the received JSON object re-encoded compactly: every member
is kept, unknown ones included, so consumers can parse it with the `lumaai`
SDK's `Generation` model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

KNOWN_STATES = ("queued", "dreaming", "completed", "failed")
#: States after which Luma sends nothing more about a generation.
TERMINAL_STATES = ("completed", "failed")
#: How far along its life each known state is; terminal states share the last rank.
STATE_RANK = {"queued": 0, "dreaming": 1, "completed": 2, "failed": 2}
#: Who wrote a record: the `luma-source` header.
SOURCE_CALLBACK = "callback"
SOURCE_RECONCILER = "reconciler"
#: With LUMA_BRIDGE_VERIFY=tag|enforce, what Luma's API said about the callback.
VERIFIED_HEADER = "luma-verified"
VERIFIED_VALUES = ("true", "false", "unknown")
#: The `luma-error` of a dead letter the reconciler wrote because Luma's API does not know the
#: generation: nothing to replay, so `deadletter replay` leaves it alone.
KAFKA_REFUSED_ERROR = "Kafka refused the record for good"
RECONCILE_NOT_FOUND_ERROR = "reconciler: Luma's API answered 404 for this generation"
KNOWN_MODELS = ("ray-2", "ray-flash-2", "ray-1-6", "photon-1", "photon-flash-1")
CONTENT_TYPE = b"application/json"
#: Where topic names start unless the operator chooses another prefix.
DEFAULT_TOPIC_PREFIX = "luma.generation"
#: The Kafka client id the bridge announces unless configured otherwise.
DEFAULT_CLIENT_ID = "luma-kafka-bridge"
#: The cluster a bridge without configuration looks for (what the AsyncAPI server names).
DEFAULT_BOOTSTRAP_SERVERS = "localhost:9092"
#: Where Luma POSTs unless the operator chooses another path; the token follows it.
DEFAULT_CALLBACK_PATH = "/luma/callback"
#: What a redacted write token is replaced with in `request.callback_url`.
REDACTED = "REDACTED"
#: The longest generation `id` accepted: Luma's are UUIDs (36 characters).
MAX_GENERATION_ID_CHARS = 256
#: The CloudEvents `source` of every record unless the operator names another.
DEFAULT_CLOUDEVENTS_SOURCE = "https://api.lumalabs.ai/dream-machine/v1"
CLOUDEVENTS_SPECVERSION = "1.0"
#: `ce_type` is this prefix and the state: `ai.lumalabs.generation.completed`.
CLOUDEVENTS_TYPE_PREFIX = "ai.lumalabs.generation."
# Bounds on what a body may hold, far above any Generation: nesting, number literals, strings.
MAX_JSON_DEPTH = 32
MAX_NUMBER_CHARS = 100
MAX_STRING_CHARS = 1024 * 1024  # the default body limit: a long prompt must pass


class InvalidCallback(ValueError):
    """The body is not a valid Generation; `reason` never echoes the input."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # a closed set, used as a metrics label: json, shape, schema


class Assets(BaseModel):
    """The documented members of `assets`; others pass through untouched."""

    model_config = ConfigDict(strict=True, extra="allow")

    video: str | None = None
    image: str | None = None
    progress_video: str | None = None


class Generation(BaseModel):
    """The documented members of a Luma `Generation`, with their documented types.

    Used only to validate: the record value is the original object, not a dump of
    this model, so nothing is renamed, reformatted or dropped.
    """

    model_config = ConfigDict(strict=True, extra="allow")

    id: str = Field(min_length=1, max_length=MAX_GENERATION_ID_CHARS)
    state: str = Field(min_length=1)
    failure_reason: str | None = None
    created_at: str | None = None
    assets: Assets | None = None
    generation_type: str | None = None
    model: str | None = None
    version: str | None = None
    request: dict[str, Any] | None = None

    @field_validator("created_at")
    @classmethod
    def _created_at_is_datetime(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_timestamp(value)
            except ValueError:
                # datetime's own message quotes the input; ours must not.
                raise ValueError("must be an RFC 3339 date-time") from None
        return value


@dataclass(frozen=True, slots=True)
class Callback:
    """A validated callback, ready to become records."""

    generation_id: str
    state: str
    value: bytes
    event_id: str
    transition_id: str
    generation_type: str | None
    model: str | None
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class Topics:
    """The names of every topic the bridge writes, derived from one prefix."""

    prefix: str

    def for_state(self, state: str) -> str:
        """`{prefix}.{state}` for a known state, `{prefix}.unknown` for any other."""
        return f"{self.prefix}.{state if state in KNOWN_STATES else 'unknown'}"

    @property
    def lifecycle(self) -> str:
        return f"{self.prefix}.lifecycle"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    def all(self, *, lifecycle: bool = True) -> tuple[str, ...]:
        """Every topic the bridge may write, in a stable order."""
        names = [f"{self.prefix}.{state}" for state in KNOWN_STATES]
        names.append(f"{self.prefix}.unknown")
        if lifecycle:
            names.append(self.lifecycle)
        names.append(self.deadletter)
        return tuple(names)


def parse_timestamp(value: str) -> datetime:
    """Parse an RFC 3339 / ISO 8601 date-time; a naive one is taken as UTC."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError("number too long")
    return int(text)


def _finite_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError("number too long")
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("number out of range")
    return number


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated member would be silently dropped by re-encoding; refuse it instead
    # so the raw body survives intact on the dead-letter topic.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


_decoder = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    parse_int=_bounded_int,
    object_pairs_hook=_object_without_duplicates,
)


def _within_bounds(document: Any) -> bool:
    """Nesting at most MAX_JSON_DEPTH, strings and member names at most MAX_STRING_CHARS.

    Walked without recursion, after decoding: the decoder itself stops at Python's
    recursion limit (a RecursionError, refused like any other bad JSON).
    """
    pending: list[tuple[Any, int]] = [(document, 1)]
    while pending:
        container, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            return False
        if isinstance(container, dict):
            if any(len(name) > MAX_STRING_CHARS for name in container):
                return False
            members = container.values()
        else:
            members = container
        for member in members:
            kind = type(member)
            if kind is dict or kind is list:
                pending.append((member, depth + 1))
            elif kind is str and len(member) > MAX_STRING_CHARS:
                return False
    return True


def _surely_within_bounds(body: bytes) -> bool:
    """True when the raw body is too small to break the bounds, whatever it holds: no
    string decodes longer than the body, and no nesting is deeper than its brackets.
    (The walk below costs as much as the decoding of a typical callback.)"""
    return len(body) <= MAX_STRING_CHARS and body.count(b"{") + body.count(b"[") <= MAX_JSON_DEPTH


def decode_object(body: bytes) -> dict[str, Any]:
    """Decode strict UTF-8 JSON whose top level is an object, or raise `InvalidCallback`."""
    try:
        document = _decoder.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        # json.JSONDecodeError, UnicodeDecodeError and our own hooks' errors are ValueErrors;
        # int() refuses over 4300 digits with one too.
        raise InvalidCallback("body is not valid UTF-8 JSON", "json") from None
    if not isinstance(document, dict):
        raise InvalidCallback("body is not a JSON object", "shape")
    if not _surely_within_bounds(body) and not _within_bounds(document):
        raise InvalidCallback(
            f"body nests deeper than {MAX_JSON_DEPTH} or holds a string longer than "
            f"{MAX_STRING_CHARS} characters",
            "json",
        )
    return document


def encode_compact(document: dict[str, Any]) -> bytes:
    """Re-encode compactly as UTF-8, members in the order received."""
    try:
        # orjson is ~25x faster; it refuses integers beyond 64 bits and lone surrogates,
        # which the standard library then handles (or refuses) below.
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(
            document, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate escape (\\ud800) decodes but has no UTF-8 form.
        raise InvalidCallback("body is not valid UTF-8 JSON", "json") from None


def describe_schema_error(exc: ValidationError) -> str:
    """Name the offending members and what was expected, never their values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "not a valid Generation: " + "; ".join(parts)


def event_id_for(generation_id: str, state: str, value: bytes) -> str:
    """Deterministic from id, state and body, so a redelivery carries the same id."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(generation_id.encode())
    digest.update(b"\0")
    digest.update(state.encode())
    digest.update(b"\0")
    digest.update(value)
    return digest.hexdigest()


def transition_id(generation_id: str, state: str, assets: object) -> str:
    """The identity of one state transition: the same whether the callback or the reconciler wrote it.

    Bodies differ between a callback and an API read of the same moment; id, state and the assets
    do not, and the assets tell progress updates within one state apart.
    """  # noqa: E501 - the summary line is shared verbatim with the reconciler
    digest = hashlib.blake2b(digest_size=16)
    digest.update(orjson.dumps([generation_id, state, assets], option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


def transition_id_of(generation_id: str, state: str, assets: object) -> str:
    """`transition_id`, also for assets orjson cannot encode (integers beyond 64 bits).

    Such a body is valid JSON and accepted; hashing the standard library's sorted, compact
    encoding instead keeps its id stable rather than failing the request over and over.
    """
    try:
        return transition_id(generation_id, state, assets)
    except orjson.JSONEncodeError:
        encoded = json.dumps(
            [generation_id, state, assets],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.blake2b(encoded.encode(), digest_size=16).hexdigest()


def redact_url_token(url: str, callback_path: str) -> str:
    """`url` without a write token: the path segment after `callback_path` and any
    `token` query parameter become `REDACTED`; everything else is kept as it was.

    The path is matched wherever it appears in the URL's path, so a prefix added by
    an ingress (`/hooks/luma/callback/<token>`) is covered too. A URL that cannot be
    parsed is replaced whole: it may still hold the token.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    path = _redact_path_token(parts.path, callback_path)
    query = parts.query
    if query and any(name == "token" for name, _ in parse_qsl(query, keep_blank_values=True)):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(name, REDACTED if name == "token" else value) for name, value in pairs],
            safe="/:",
        )
    netloc = parts.netloc
    if "@" in netloc:  # a password in the userinfo is a credential too
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else netloc
    if (path, query, netloc) == (parts.path, parts.query, parts.netloc):
        return url
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


def _redact_path_token(path: str, callback_path: str) -> str:
    """The segment after the first occurrence of `callback_path`'s segments, compared
    decoded: the bridge routes on the decoded path, so `/luma/%63allback/<token>`
    reaches it with a token that works."""
    marker = callback_path.strip("/").split("/")
    segments = path.split("/")
    decoded = [unquote(segment) for segment in segments]
    for start in range(len(segments) - len(marker)):
        if decoded[start : start + len(marker)] == marker:
            token = start + len(marker)
            if not segments[token]:
                return path
            return "/".join([*segments[:token], REDACTED, *segments[token + 1 :]])
    return path


def redact_callback_token(value: dict[str, Any], callback_path: str) -> dict[str, Any]:
    """A Generation without the bridge's write token in `request.callback_url`.

    Luma echoes the callback URL it was given, and that URL carries the token that
    lets anyone write to the bridge: it must not reach Kafka's readers. Returns
    `value` itself when there is nothing to redact, else a copy (never mutates).
    Used on callbacks before the event id is computed, and by anything else that
    writes a Generation it got from Luma.
    """
    request = value.get("request")
    if not isinstance(request, dict):
        return value
    url = request.get("callback_url")
    if not isinstance(url, str):
        return value
    redacted = redact_url_token(url, callback_path)
    if redacted == url:
        return value
    return {**value, "request": {**request, "callback_url": redacted}}


def _raw_forms(text: str) -> bytes:
    """A pattern for `text` as it may stand in the raw bytes of a JSON body: each character
    itself, percent-encoded (as a URL must carry a path that needs it, and as anyone may
    write any character) or JSON-escaped (`\\u0063`), hexadecimal digits in either case."""
    return b"".join(_raw_char(char) for char in text)


def _raw_char(char: str) -> bytes:
    utf8 = char.encode()
    percent = "".join(f"%{byte:02x}" for byte in utf8)
    # JSON escapes UTF-16 code units: a character beyond U+FFFF is a surrogate pair.
    units = char.encode("utf-16-be")
    escaped = "".join(f"\\u{units[n : n + 2].hex()}" for n in range(0, len(units), 2))
    either_case = re.escape(percent.encode()) + b"|" + re.escape(escaped.encode())
    return b"(?:" + re.escape(utf8) + b"|(?i:" + either_case + b"))"


# `&` JSON-escaped too: some encoders write it `\\u0026`.
_TOKEN_QUERY = re.compile(rb"((?:[?&]|(?i:\\u0026))" + _raw_forms("token") + rb"=)[^&#\"\\\s]+")


def redact_raw_token(body: bytes, callback_path: str) -> bytes:
    """Best-effort redaction of the write token in raw bytes (a dead letter's body).

    A dead letter keeps the body as received, but not the credential: the segment
    after `callback_path` and a `token=` query value are replaced wherever they appear,
    written as the bridge would route them (see `_raw_forms`; slashes escaped as JSON
    allows, `\\/`, included).
    """
    segments = [_raw_forms(part) for part in callback_path.strip("/").split("/")]
    slash = rb"\\?/"
    marker = slash + slash.join(segments) + slash
    path_token = re.compile(rb"(" + marker + rb")[^/?#\"\\\s]+")
    body = path_token.sub(rb"\g<1>" + REDACTED.encode(), body)
    return _TOKEN_QUERY.sub(rb"\g<1>" + REDACTED.encode(), body)


def parse_callback(body: bytes, *, callback_path: str = DEFAULT_CALLBACK_PATH) -> Callback:
    """Validate a raw callback body and derive everything its records need.

    The write token in `request.callback_url` is redacted before the value and the
    event id are made (`redact_callback_token`).
    """
    document = redact_callback_token(decode_object(body), callback_path)
    value = encode_compact(document)
    try:
        generation = Generation.model_validate(document)
    except ValidationError as exc:
        raise InvalidCallback(describe_schema_error(exc), "schema") from None
    request_model = generation.request.get("model") if generation.request else None
    model = generation.model or (request_model if isinstance(request_model, str) else None)
    return Callback(
        generation_id=generation.id,
        state=generation.state,
        value=value,
        event_id=event_id_for(generation.id, generation.state, value),
        transition_id=transition_id_of(generation.id, generation.state, document.get("assets")),
        generation_type=generation.generation_type,
        model=model,
        created_at=parse_timestamp(generation.created_at) if generation.created_at else None,
    )


def rfc3339(moment: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class CloudEvents:
    """Whether records carry CloudEvents attributes (Kafka binding, binary mode), and the source."""

    enabled: bool = True
    source: str = DEFAULT_CLOUDEVENTS_SOURCE


#: Records carry CloudEvents attributes with the default source unless told otherwise.
CLOUDEVENTS_ON = CloudEvents()


def record_headers(
    callback: Callback,
    received_at: datetime,
    *,
    cloudevents: CloudEvents = CLOUDEVENTS_ON,
    source: str = SOURCE_CALLBACK,
) -> list[tuple[str, bytes]]:
    """The headers of a callback's records (per-state and lifecycle alike).

    `source` says who wrote it: the receiver (`callback`) or the reconciler, which
    read the same Generation from Luma's API (`reconciler`).
    """
    received = rfc3339(received_at).encode()
    headers = [
        ("content-type", CONTENT_TYPE),
        ("luma-event-id", callback.event_id.encode()),
        ("luma-transition-id", callback.transition_id.encode()),
        ("luma-state", callback.state.encode()),
        ("luma-received-at", received),
        ("luma-source", source.encode()),
    ]
    if callback.generation_type is not None:
        headers.append(("luma-generation-type", callback.generation_type.encode()))
    if cloudevents.enabled:
        headers.extend(cloudevents_headers(callback, received, cloudevents.source))
    return headers


def cloudevents_headers(
    callback: Callback, received: bytes, source: str
) -> list[tuple[str, bytes]]:
    """CloudEvents' Kafka protocol binding, binary content mode: the attributes as `ce_` headers.

    The value is the event's data and `content-type` its `datacontenttype`, both already
    written; `ce_id` is the transition id, so a consumer deduplicating on source and id
    drops a callback and the reconciler's record of the same transition alike.
    """
    return [
        ("ce_specversion", CLOUDEVENTS_SPECVERSION.encode()),
        ("ce_id", callback.transition_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", (CLOUDEVENTS_TYPE_PREFIX + callback.state).encode()),
        ("ce_subject", callback.generation_id.encode()),
        ("ce_time", received),
    ]


def refused_record_letter_headers(
    headers: Sequence[tuple[str, bytes]], topic: str, kafka_error: str
) -> list[tuple[str, bytes]]:
    """The headers of the dead letter for a record Kafka refused for good on `topic`:
    the same two as every dead letter, the reception time kept from the record."""
    received = dict(headers).get("luma-received-at", b"")
    reason = f"{KAFKA_REFUSED_ERROR} on {topic}: {kafka_error}"
    return [("luma-error", reason.encode()), ("luma-received-at", received)]


def deadletter_headers(reason: str, received_at: datetime) -> list[tuple[str, bytes]]:
    """The headers of a dead letter: why it was refused and when it came."""
    return [
        ("luma-error", reason.encode()),
        ("luma-received-at", rfc3339(received_at).encode()),
    ]
