"""The AsyncAPI document: up to date, valid for the AsyncAPI CLI, and true to the records.

"True" both ways: every topic and header the bridge writes is documented, and every
documented channel and header is written; each record's headers and value validate
against the document's schemas.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main as cli_main
from bridge.contract.asyncapi import (
    EXAMPLE_RECEIVED_AT,
    EXAMPLES,
    asyncapi_document,
    channel_topics,
    render_yaml,
    value_schema,
)
from bridge.contract.callback import parse_callback, record_headers
from bridge.delivery.topics import existing_topics
from bridge.devtools.fake_luma import FakeLumaAPI
from tests.conftest import KafkaBroker, unavailable
from tests.consume.support import generation, send
from tests.helpers import (
    SEED_COMPLETED_VIDEO,
    SEED_FAILED_VIDEO,
    bridge_settings,
    read_topic,
    running_bridge,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
REGENERATE = "luma-kafka-bridge schema --asyncapi > docs/asyncapi.yaml"


VERIFY_KEY = "asyncapi-test-luma-key"


def jsonschema_module() -> Any:
    try:
        # Imported by name: it ships no type stubs, and only this module needs it.
        return importlib.import_module("jsonschema")
    except ImportError:
        unavailable("the jsonschema package is not installed")
        raise


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return loaded


@pytest.fixture
def asyncapi_cli(tmp_path: Path) -> tuple[str, dict[str, str]]:
    local = ROOT / "node_modules" / ".bin" / "asyncapi"
    found = str(local) if local.exists() else shutil.which("asyncapi")
    if found is None:
        unavailable("the AsyncAPI CLI is not installed (npm ci at the repository root)")
        raise AssertionError("unreachable")
    # No usage analytics: they would try the network and print a banner.
    config = tmp_path / "asyncapi-analytics.json"
    config.write_text(json.dumps({"analyticsEnabled": "false", "infoMessageShown": "true"}))
    return found, {**os.environ, "ASYNCAPI_METRICS_CONFIG_PATH": str(config)}


def test_the_committed_document_is_what_the_code_generates() -> None:
    assert DOCUMENT.read_text() == render_yaml(asyncapi_document()), f"stale: run {REGENERATE}"


def test_the_asyncapi_cli_finds_no_error_nor_warning(
    asyncapi_cli: tuple[str, dict[str, str]],
) -> None:
    binary, env = asyncapi_cli
    done = subprocess.run(
        [binary, "validate", str(DOCUMENT), "--fail-severity", "warn"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout


def test_schema_command_prints_the_value_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == value_schema()
    jsonschema_module().Draft202012Validator.check_schema(printed)
    assert cli_main(["schema", "--asyncapi"]) == 0
    assert capsys.readouterr().out == DOCUMENT.read_text()


def test_examples_are_the_seeds_with_the_headers_the_bridge_computes(
    document: dict[str, Any],
) -> None:
    examples = document["components"]["messages"]["GenerationRecord"]["examples"]
    assert [e["payload"] for e in examples] == [SEED_COMPLETED_VIDEO, SEED_FAILED_VIDEO]
    assert [e["payload"] for e in examples] == [payload for _, _, payload in EXAMPLES]
    for example in examples:
        callback = parse_callback(json.dumps(example["payload"]).encode())
        expected = {k: v.decode() for k, v in record_headers(callback, EXAMPLE_RECEIVED_AT)}
        assert example["headers"] == expected


def validator(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A validator for `schema` whose `#/components/...` references resolve in `document`."""
    jsonschema = jsonschema_module()
    rooted = {**schema, "components": document["components"]}
    return jsonschema.Draft202012Validator(rooted, format_checker=jsonschema.FormatChecker())


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


async def test_every_record_the_bridge_writes_is_documented_and_nothing_else(
    kafka_broker: KafkaBroker, document: dict[str, Any]
) -> None:
    # With verification on (tag: answers unchanged), so `luma-verified` is written too.
    async with FakeLumaAPI(api_key=VERIFY_KEY) as luma:
        luma.put(SEED_COMPLETED_VIDEO)
        settings = bridge_settings(
            kafka_broker.bootstrap,
            kafka_broker.supports_idempotence,
            verify="tag",
            luma_api_key=VERIFY_KEY,
            luma_base_url=luma.base_url,
            kafka_ack_timeout=3.0,
        )
        prefix = settings.topic_prefix
        async with running_bridge(settings) as server:
            await send(server, SEED_COMPLETED_VIDEO)
            await send(server, SEED_FAILED_VIDEO)
            await send(server, generation("gen-q", "queued", assets=None, generation_type="video"))
            await send(
                server, generation("gen-d", "dreaming", assets={"progress_video": "https://p"})
            )
            await send(server, generation("gen-u", "paused-by-luma"))
            await send(server, b'{"id":"abc","state":7}', status=400)
            await send(server, b"\xff not even utf-8", status=400)

    topics = {topic for topic in await existing_topics(settings) if topic.startswith(prefix + ".")}
    documented = {
        name: channel["address"].replace("{prefix}", prefix)
        for name, channel in document["channels"].items()
    }
    assert documented == channel_topics(prefix)
    assert set(documented.values()) == topics, "the bridge's topics and the document differ"

    expected_counts = {"lifecycle": 5, "deadletter": 2, "unknown": 1}
    headers_seen: dict[str, set[str]] = {}
    for name, topic in documented.items():
        records = await read_topic(
            kafka_broker.bootstrap, topic, expected=expected_counts.get(name, 1)
        )
        channel = document["channels"][name]
        (message_ref,) = channel["messages"].values()
        message = resolve(document, message_ref)
        header_schema = resolve(document, message["headers"])
        check_headers = validator(document, header_schema)
        check_payload = validator(document, resolve(document, message["payload"]))
        key_schema = message["bindings"]["kafka"]["key"]
        for record in records:
            headers = {k: v.decode() for k, v in record.headers}
            headers_seen.setdefault(message["name"], set()).update(headers)
            check_headers.validate(headers)
            if key_schema["type"] == "null":
                assert record.key is None
                check_payload.validate(record.value.decode("utf-8", "replace"))
            else:
                value = json.loads(record.value)
                check_payload.validate(value)
                value_check = validator(document, value_schema())
                value_check.validate(value)
                assert record.key == value["id"].encode()
                assert headers["content-type"] == message["contentType"]

    for message_name, seen in headers_seen.items():
        message = document["components"]["messages"][message_name]
        assert seen == set(resolve(document, message["headers"])["properties"]), message_name


async def test_documented_event_ids_are_the_ones_the_bridge_writes(
    kafka_broker: KafkaBroker, document: dict[str, Any]
) -> None:
    settings = bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)
    async with running_bridge(settings) as server:
        await send(server, SEED_COMPLETED_VIDEO)
    (record,) = await read_topic(
        kafka_broker.bootstrap, f"{settings.topic_prefix}.completed", expected=1
    )
    (example, _) = document["components"]["messages"]["GenerationRecord"]["examples"]
    headers = {k: v.decode() for k, v in record.headers}
    assert headers["luma-event-id"] == example["headers"]["luma-event-id"]
    assert re.fullmatch(
        document["components"]["schemas"]["GenerationRecordHeaders"]["properties"][
            "luma-received-at"
        ]["pattern"],
        headers["luma-received-at"],
    )
