"""The record contract as documents: the JSON Schema of a record value, and AsyncAPI 3.

Both are generated from the code that writes the records (`bridge.contract.callback`:
the `Generation` model, `Topics`, `record_headers`, `deadletter_headers` and the
defaults the settings use), so they cannot drift from what the bridge does.
`docs/asyncapi.yaml` is this module's output; a test fails when it is stale:

    luma-kafka-bridge schema --asyncapi > docs/asyncapi.yaml
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any, TextIO

from bridge import __version__
from bridge.contract.callback import (
    CLOUDEVENTS_SPECVERSION,
    CLOUDEVENTS_TYPE_PREFIX,
    CONTENT_TYPE,
    DEFAULT_BOOTSTRAP_SERVERS,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLOUDEVENTS_SOURCE,
    DEFAULT_TOPIC_PREFIX,
    KNOWN_STATES,
    RECONCILE_NOT_FOUND_ERROR,
    VERIFIED_HEADER,
    VERIFIED_VALUES,
    CloudEvents,
    Generation,
    InvalidCallback,
    Topics,
    deadletter_headers,
    parse_callback,
    record_headers,
)

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
PREFIX_PARAMETER = "prefix"

#: When the examples' records were received (fixed, so the document is reproducible).
EXAMPLE_RECEIVED_AT = datetime(2026, 5, 30, 12, 35, 2, 345000, tzinfo=UTC)

#: The seed's examples (Luma's callback AsyncAPI document), as Luma sends them.
EXAMPLES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "completed-video",
        "A completed text-to-video generation",
        {
            "id": "d1ad97c4-9d8f-4e3a-9c2e-3b8c0b9b1e2a",
            "state": "completed",
            "failure_reason": None,
            "created_at": "2026-05-30T12:34:56.000Z",
            "assets": {"video": "https://storage.cdn-luma.com/.../generation.mp4"},
            "version": "ray-2",
            "request": {
                "prompt": "A teddy bear in sunglasses playing electric guitar and dancing",
                "aspect_ratio": "16:9",
                "loop": False,
            },
        },
    ),
    (
        "failed-video",
        "A failed generation",
        {
            "id": "fbb8c4c1-6f0a-4f9d-8a64-4c6c1f6c9f00",
            "state": "failed",
            "failure_reason": "Generation failed due to invalid keyframe asset.",
            "created_at": "2026-05-30T12:34:56.000Z",
            "assets": None,
            "request": {"prompt": "A surfer riding a wave at sunset"},
        },
    ),
)
DEADLETTER_EXAMPLE = b'{"id":"abc","state":7}'

#: What each member of the value means. Every model field must be here (checked).
MEMBER_DESCRIPTIONS: dict[str, str] = {
    "id": "Unique identifier of the generation (at most 256 characters); also the record key.",
    "state": "Lifecycle state: queued, dreaming, completed or failed "
    "(any other value is routed to the `unknown` topic).",
    "failure_reason": "Why the generation failed, when `state` is `failed`.",
    "created_at": "When the generation was created (RFC 3339).",
    "assets": "URLs of the produced media; set when `state` is `completed`.",
    "generation_type": "video, image, ... (copied to the `luma-generation-type` header).",
    "model": "Model that produced the generation (for example `ray-2`).",
    "version": "Model version identifier (older callbacks carry the model here).",
    "request": "Echo of the request that created the generation, as Luma sent it, except "
    "that the bridge's write token in `request.callback_url` is replaced with `REDACTED` "
    "(the path segment after the callback path, and a `token` query parameter) before the "
    "record is written and its event id computed.",
    "video": "HTTPS URL of the generated video.",
    "image": "HTTPS URL of the generated image.",
    "progress_video": "HTTPS URL of a preview while the generation is dreaming.",
}

#: Each header the bridge writes: its schema. Every written header must be here (checked).
HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "content-type": {
        "type": "string",
        "const": CONTENT_TYPE.decode(),
        "description": "Media type of the value.",
    },
    "luma-event-id": {
        "type": "string",
        "description": "Deterministic id of this callback (from generation id, state and "
        "the value as written, write token redacted): a redelivery of the same body "
        "carries the same id.",
    },
    "luma-transition-id": {
        "type": "string",
        "pattern": "^[0-9a-f]{32}$",
        "description": "Deterministic id of the state transition (from generation id, state "
        "and `assets`): the same for every record of one moment of a generation, whether "
        "written from a callback or by the reconciler from Luma's API, and new for each "
        "progress update within a state. Consumers dedupe on it (on `luma-event-id` for "
        "records that lack it). Equal to `ce_id`.",
    },
    "luma-source": {
        "type": "string",
        "enum": ["callback", "reconciler"],
        "description": "Who wrote the record: the receiver, from Luma's callback (`callback`), "
        "or `luma-kafka-bridge reconcile`, from Luma's API after the callback was lost "
        "(`reconciler`).",
    },
    VERIFIED_HEADER: {
        "type": "string",
        "enum": list(VERIFIED_VALUES),
        "description": "Only with LUMA_BRIDGE_VERIFY=tag|enforce: what Luma's API said about "
        "the callback when it arrived. `true`: the API reports this state or a later one (and, "
        "for `completed` and `failed`, the same asset URLs); `false` (only under `tag`; "
        "`enforce` refuses it): the generation does not exist, or the callback is ahead of the "
        "API or contradicts it; `unknown`: the API did not answer in time, or the state "
        "cannot be compared. Absent when verification is off and on reconciler records.",
    },
    "luma-state": {
        "type": "string",
        "description": "The generation's `state`, as in the value.",
        "examples": list(KNOWN_STATES),
    },
    "luma-received-at": {
        "type": "string",
        "format": "date-time",
        "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$",
        "description": "When the bridge received the callback: RFC 3339, UTC, milliseconds.",
    },
    "luma-generation-type": {
        "type": "string",
        "description": "The value's `generation_type`; absent when the value has none.",
    },
    "ce_specversion": {
        "type": "string",
        "const": CLOUDEVENTS_SPECVERSION,
        "description": "CloudEvents binary content mode (Kafka protocol binding): the spec "
        "version. The `ce_` headers are written unless LUMA_BRIDGE_CLOUDEVENTS=false; the "
        "value is the event's data and `content-type` its datacontenttype.",
    },
    "ce_id": {
        "type": "string",
        "description": "CloudEvents id: the transition id (`luma-transition-id`), so "
        "consumers that deduplicate on source and id drop repeated transitions.",
    },
    "ce_source": {
        "type": "string",
        "format": "uri-reference",
        "examples": [DEFAULT_CLOUDEVENTS_SOURCE],
        "description": "CloudEvents source: LUMA_BRIDGE_CLOUDEVENTS_SOURCE (default "
        f"`{DEFAULT_CLOUDEVENTS_SOURCE}`).",
    },
    "ce_type": {
        "type": "string",
        "pattern": "^" + CLOUDEVENTS_TYPE_PREFIX.replace(".", r"\.") + ".+$",
        "examples": [CLOUDEVENTS_TYPE_PREFIX + state for state in KNOWN_STATES],
        "description": f"CloudEvents type: `{CLOUDEVENTS_TYPE_PREFIX}` and the state.",
    },
    "ce_subject": {
        "type": "string",
        "description": "CloudEvents subject: the generation id (also the record key).",
    },
    "ce_time": {
        "type": "string",
        "format": "date-time",
        "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$",
        "description": "CloudEvents time: when the bridge received the callback "
        "(`luma-received-at`).",
    },
    "luma-error": {
        "type": "string",
        "description": "Why the body was refused. Names members, never echoes their values. "
        f"`{RECONCILE_NOT_FOUND_ERROR}` marks the reconciler's note that Luma's API does not "
        "know a generation (value: its id and last state in Kafka as JSON); "
        "`deadletter replay` leaves those alone.",
    },
}


def _callback_headers() -> tuple[dict[str, str], list[str]]:
    """Every header of a generation record, by name, and the ones always present."""
    base = {"id": "probe", "state": "completed"}
    full = parse_callback(json.dumps({**base, "generation_type": "video"}).encode())
    bare = parse_callback(json.dumps(base).encode())
    written = dict(
        (name, value.decode()) for name, value in record_headers(full, EXAMPLE_RECEIVED_AT)
    )
    # The ce_ headers can be switched off, so no consumer may require them.
    cloudevents_off = CloudEvents(enabled=False)
    always = [
        name for name, _ in record_headers(bare, EXAMPLE_RECEIVED_AT, cloudevents=cloudevents_off)
    ]
    return written, always


def _header_schema(names: list[str], required: list[str]) -> dict[str, Any]:
    properties = {}
    for name in names:
        if name not in HEADER_SCHEMAS:
            raise RuntimeError(f"header {name!r} is written but not described in {__name__}")
        properties[name] = copy.deepcopy(HEADER_SCHEMAS[name])
    return {
        "type": "object",
        "description": "Kafka record headers; every value is UTF-8 text.",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


def record_header_schema() -> dict[str, Any]:
    """The headers of per-state and lifecycle records, derived from `record_headers`."""
    written, always = _callback_headers()
    # Added by the pipeline, not by `record_headers`, when verification is on.
    schema = _header_schema([*written, VERIFIED_HEADER], always)
    for name in ("luma-event-id", "luma-transition-id", "ce_id"):
        schema["properties"][name]["pattern"] = f"^[0-9a-f]{{{len(written[name])}}}$"
    return schema


def deadletter_header_schema() -> dict[str, Any]:
    """The headers of dead letters, derived from `deadletter_headers`."""
    names = [name for name, _ in deadletter_headers("probe", EXAMPLE_RECEIVED_AT)]
    return _header_schema(names, names)


def _describe_members(schema: dict[str, Any]) -> None:
    for name, member in schema.get("properties", {}).items():
        if name not in MEMBER_DESCRIPTIONS:
            raise RuntimeError(f"member {name!r} of the value is not described in {__name__}")
        member["description"] = MEMBER_DESCRIPTIONS[name]
        member.pop("title", None)
    schema.pop("title", None)


def _value_schemas(ref_template: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The Generation schema and the schemas it refers to, described for consumers."""
    schema = Generation.model_json_schema(ref_template=ref_template)
    definitions: dict[str, dict[str, Any]] = schema.pop("$defs", {})
    _describe_members(schema)
    schema["description"] = (
        "The Generation object exactly as Luma sent it, re-encoded compactly as UTF-8 JSON: "
        "every member is kept, unknown ones included (additionalProperties), so it parses "
        "with the `lumaai` SDK's Generation model. The members listed are the ones the "
        "bridge validates; their types are checked, their values passed through. The one "
        "change: the write token Luma echoes in `request.callback_url` is replaced with "
        "`REDACTED`, so no reader of the topics holds the bridge's credential."
    )
    for variant in schema["properties"]["created_at"].get("anyOf", []):
        if variant.get("type") == "string":
            variant["format"] = "date-time"
    for definition in definitions.values():
        _describe_members(definition)
    definitions["Assets"]["description"] = "Media URLs; members other than these pass through."
    return schema, definitions


def value_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a generation record's value: what `schema` prints."""
    schema, definitions = _value_schemas("#/$defs/{model}")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "Generation",
        **schema,
        "$defs": definitions,
    }


def _example(name: str, summary: str, payload: dict[str, Any]) -> dict[str, Any]:
    callback = parse_callback(json.dumps(payload).encode())
    headers = dict(
        (key, value.decode()) for key, value in record_headers(callback, EXAMPLE_RECEIVED_AT)
    )
    return {"name": name, "summary": summary, "headers": headers, "payload": payload}


def _deadletter_example() -> dict[str, Any]:
    try:
        parse_callback(DEADLETTER_EXAMPLE)
    except InvalidCallback as exc:
        reason = exc.reason
    else:  # pragma: no cover - the example is invalid by construction
        raise RuntimeError("the dead-letter example must be invalid")
    headers = dict(
        (key, value.decode()) for key, value in deadletter_headers(reason, EXAMPLE_RECEIVED_AT)
    )
    return {
        "name": "wrong-state-type",
        "summary": "A body whose `state` is not a string",
        "headers": headers,
        "payload": DEADLETTER_EXAMPLE.decode(),
    }


def _channel(address: str, title: str, description: str, message: str) -> dict[str, Any]:
    return {
        "address": address,
        "title": title,
        "description": description,
        "parameters": {PREFIX_PARAMETER: {"$ref": f"#/components/parameters/{PREFIX_PARAMETER}"}},
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
    }


def channel_topics(prefix: str) -> dict[str, str]:
    """Channel name → the topic it is, for a given prefix (what the tests compare)."""
    topics = Topics(prefix)
    names = {state: topics.for_state(state) for state in KNOWN_STATES}
    names["unknown"] = topics.for_state("")
    names["lifecycle"] = topics.lifecycle
    names["deadletter"] = topics.deadletter
    if set(names.values()) != set(topics.all(lifecycle=True)):
        raise RuntimeError("Topics.all() and the documented channels disagree")
    return names


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3 document of everything the bridge publishes."""
    prefix_default = DEFAULT_TOPIC_PREFIX
    placeholder = "{" + PREFIX_PARAMETER + "}"
    schema, definitions = _value_schemas("#/components/schemas/{model}")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    descriptions = {
        "queued": "Callbacks whose state is `queued`.",
        "dreaming": "Callbacks whose state is `dreaming` (in progress; may repeat).",
        "completed": "Callbacks whose state is `completed`: `assets` holds the media URLs.",
        "failed": "Callbacks whose state is `failed`: `failure_reason` says why.",
        "unknown": "Callbacks whose state is none of queued, dreaming, completed, failed.",
        "lifecycle": "Every accepted callback, whatever its state. Keyed by generation id, so "
        "one generation's callbacks stay in one partition, in the order received. Written "
        "unless LUMA_BRIDGE_LIFECYCLE_TOPIC=false.",
        "deadletter": "Bodies the bridge refused (not JSON, not an object, not a valid "
        "Generation), byte for byte as received, with the reason. Replay them with "
        "`luma-kafka-bridge deadletter replay` once their cause is fixed.",
    }
    for channel, topic in channel_topics(placeholder).items():
        message = "DeadLetter" if channel == "deadletter" else "GenerationRecord"
        title = f"{channel} topic"
        channels[channel] = _channel(topic, title, descriptions[channel], message)
        operation = f"publish{channel.capitalize()}"
        operations[operation] = {
            "action": "send",
            "title": f"Write to the {channel} topic",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
            "bindings": {
                "kafka": {
                    "clientId": {
                        "type": "string",
                        "enum": [DEFAULT_CLIENT_ID],
                    },
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            },
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:com:lumalabs:dream-machine:kafka-bridge",
        "info": {
            "title": "Luma Dream Machine generations on Kafka (luma-kafka-bridge)",
            "version": __version__,
            "description": (
                "What luma-kafka-bridge writes to Kafka for each Luma Dream Machine "
                "generation callback it receives over HTTP.\n\n"
                "* Key: the generation id (UTF-8), so each generation's records stay in "
                "order within a partition.\n"
                "* Value: the Generation object as received, re-encoded compactly.\n"
                "* Delivery is at-least-once: a record may appear twice; dedupe on the "
                "`luma-transition-id` header (the same for one state transition whether "
                "it came from a callback or from the reconciler).\n"
                "* Every generation record is also a CloudEvent in the Kafka protocol "
                "binding's binary content mode (`ce_` headers, unless "
                "LUMA_BRIDGE_CLOUDEVENTS=false). Dead letters are not: they carry no "
                "valid generation id or state to describe.\n"
                "* Per-generation order holds on the lifecycle topic; the per-state topics "
                "are separate topics, read at separate speeds.\n\n"
                "Generated from the bridge's code by `luma-kafka-bridge schema --asyncapi`."
            ),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": CONTENT_TYPE.decode(),
        "servers": {
            "kafka": {
                "host": DEFAULT_BOOTSTRAP_SERVERS,
                "protocol": "kafka",
                "description": "The cluster named by LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "parameters": {
                PREFIX_PARAMETER: {
                    "default": prefix_default,
                    "examples": [prefix_default],
                    "description": "The topic prefix, LUMA_BRIDGE_TOPIC_PREFIX.",
                }
            },
            "messages": {
                "GenerationRecord": {
                    "name": "GenerationRecord",
                    "title": "A generation callback",
                    "summary": "One callback from Luma, as accepted by the bridge.",
                    "contentType": CONTENT_TYPE.decode(),
                    "headers": {"$ref": "#/components/schemas/GenerationRecordHeaders"},
                    "payload": {"$ref": "#/components/schemas/Generation"},
                    "bindings": {
                        "kafka": {
                            "key": {
                                "type": "string",
                                "description": "The generation id (`id` of the value), UTF-8.",
                            },
                            "bindingVersion": KAFKA_BINDING_VERSION,
                        }
                    },
                    "examples": [_example(*example) for example in EXAMPLES],
                },
                "DeadLetter": {
                    "name": "DeadLetter",
                    "title": "A refused callback body",
                    "summary": "A body that is not a valid Generation, kept byte for byte.",
                    "contentType": "application/octet-stream",
                    "headers": {"$ref": "#/components/schemas/DeadLetterHeaders"},
                    "payload": {
                        "type": "string",
                        "description": "The raw request body, as received (may not be JSON, "
                        "nor even UTF-8), except that the bridge's write token is replaced with "
                        "`REDACTED` where it appears literally after the callback path or as "
                        "`token=`.",
                    },
                    "bindings": {
                        "kafka": {
                            "key": {"type": "null", "description": "Dead letters have no key."},
                            "bindingVersion": KAFKA_BINDING_VERSION,
                        }
                    },
                    "examples": [_deadletter_example()],
                },
            },
            "schemas": {
                "Generation": schema,
                **definitions,
                "GenerationRecordHeaders": record_header_schema(),
                "DeadLetterHeaders": deadletter_header_schema(),
            },
        },
    }


def render_yaml(document: dict[str, Any]) -> str:
    """The document as YAML, in the order built (stable, so the file diff is readable).

    Multi-line text is written as literal blocks, the way a person would. PyYAML is
    imported here so that the rest of the CLI works without it.
    """
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(document, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)


def schema_command(*, asyncapi: bool, out: TextIO) -> int:
    """`luma-kafka-bridge schema [--asyncapi]`: print the value's JSON Schema, or the document."""
    if asyncapi:
        out.write(render_yaml(asyncapi_document()))
    else:
        out.write(json.dumps(value_schema(), indent=2, ensure_ascii=False) + "\n")
    return 0
