"""The write token in `request.callback_url` never reaches a record (issue 11).

Luma echoes the callback URL it was given in the Generation it POSTs, and that
URL carries the token that lets anyone write to the bridge. The seed's own
example is used, with the callback URL its server section describes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from bridge.contract.asyncapi import value_schema
from bridge.contract.callback import (
    REDACTED,
    event_id_for,
    parse_callback,
    redact_callback_token,
    redact_raw_token,
    redact_url_token,
    refused_record_letter_headers,
)

SEED = Path("/work/shared/seed/luma-dream-machine-callback.asyncapi.yaml")
TOKEN = "s3cr3t-t0ken-0123456789abcdef"
PATH = "/luma/callback"


def seed_document() -> dict[str, Any]:
    if SEED.exists():
        loaded: dict[str, Any] = yaml.safe_load(SEED.read_text())
        return loaded
    # The seed lives beside the repository on the build machine; the test keeps a copy
    # of the two parts it needs so it runs anywhere.
    return {
        "servers": {
            "customer-callback": {
                "variables": {"callback_url": {"default": "https://example.com/luma/callback"}}
            }
        },
        "channels": {},
        "components": {"messages": {"GenerationCallback": {"examples": [SEED_EXAMPLE]}}},
    }


SEED_EXAMPLE = {
    "name": "completed-video",
    "payload": {
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
}


def seed_callback_with_url(url_of: str) -> dict[str, Any]:
    """The seed's completed-video example as Luma echoes it: with `request.callback_url`."""
    seed = seed_document()
    examples = seed["components"]["messages"]["GenerationCallback"]["examples"]
    example = next(e for e in examples if e["name"] == "completed-video")
    payload: dict[str, Any] = copy.deepcopy(example["payload"])
    base = seed["servers"]["customer-callback"]["variables"]["callback_url"]["default"]
    payload["request"]["callback_url"] = url_of.format(base=base, token=TOKEN)
    return payload


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("{base}/{token}", f"https://example.com/luma/callback/{REDACTED}"),
        ("{base}?token={token}", f"https://example.com/luma/callback?token={REDACTED}"),
        (
            "{base}/{token}?token={token}&x=1",
            f"https://example.com/luma/callback/{REDACTED}?token={REDACTED}&x=1",
        ),
        # An ingress prefix in front of the bridge's own path.
        (
            "https://example.com/hooks/luma/callback/{token}",
            f"https://example.com/hooks/luma/callback/{REDACTED}",
        ),
        ("{base}", "https://example.com/luma/callback"),
    ],
)
def test_the_token_never_reaches_the_record_value(url: str, redacted: str) -> None:
    payload = seed_callback_with_url(url)
    callback = parse_callback(json.dumps(payload).encode(), callback_path=PATH)
    assert TOKEN.encode() not in callback.value
    value = orjson.loads(callback.value)
    assert value["request"]["callback_url"] == redacted
    # Everything else is kept as received.
    del value["request"]["callback_url"], payload["request"]["callback_url"]
    assert value == payload


def test_the_event_id_is_computed_after_redaction() -> None:
    """Two tokens for one generation (rotation) give one event id, and the id is the
    hash of what is written, so consumers can recompute it from the record."""
    old = parse_callback(json.dumps(seed_callback_with_url("{base}/{token}")).encode())
    payload = seed_callback_with_url("{base}/{token}")
    payload["request"]["callback_url"] = payload["request"]["callback_url"].replace(
        TOKEN, "another-token-after-rotation"
    )
    new = parse_callback(json.dumps(payload).encode())
    assert old.event_id == new.event_id
    assert old.event_id == event_id_for(old.generation_id, old.state, old.value)


def test_redaction_is_pure_and_leaves_other_values_alone() -> None:
    payload = seed_callback_with_url("{base}/{token}")
    before = copy.deepcopy(payload)
    redacted = redact_callback_token(payload, PATH)
    assert payload == before  # not mutated
    assert redacted["request"]["callback_url"].endswith("/" + REDACTED)
    plain = seed_callback_with_url("{base}")
    assert redact_callback_token(plain, PATH) is plain
    for odd in (
        {"id": "g", "state": "queued"},
        {"request": None},
        {"request": {"callback_url": 7}},
    ):
        assert redact_callback_token(odd, PATH) is odd


def test_a_custom_callback_path_and_userinfo_are_redacted() -> None:
    url = f"https://bridge:pw@example.com/hooks/luma/{TOKEN}/?token={TOKEN}#frag"
    redacted = redact_url_token(url, "/hooks/luma")
    assert TOKEN not in redacted
    assert "pw" not in redacted
    assert redacted == (
        f"https://bridge:{REDACTED}@example.com/hooks/luma/{REDACTED}/?token={REDACTED}#frag"
    )


def test_a_dead_letter_body_keeps_its_bytes_but_not_the_token() -> None:
    payload = seed_callback_with_url("{base}/{token}?token={token}")
    payload["state"] = 7  # invalid: this body is dead-lettered raw
    body = json.dumps(payload, indent=2).encode()
    evidence = redact_raw_token(body, PATH)
    assert TOKEN.encode() not in evidence
    assert evidence == body.replace(TOKEN.encode(), REDACTED.encode())


def test_the_published_contract_says_the_token_is_redacted() -> None:
    schema = value_schema()
    assert REDACTED in schema["properties"]["request"]["description"]
    assert REDACTED in schema["description"]
    assert schema["properties"]["id"]["maxLength"] == 256
    published = Path(__file__).parents[2] / "docs" / "asyncapi.yaml"
    assert "request.callback_url" in published.read_text()


def test_a_dead_letter_with_escaped_slashes_loses_the_token_too() -> None:
    body = (
        b'{"id":"g","state":7,"request":{"callback_url":'
        b'"https:\\/\\/example.com\\/luma\\/callback\\/' + TOKEN.encode() + b'"}}'
    )
    evidence = redact_raw_token(body, PATH)
    assert TOKEN.encode() not in evidence
    assert evidence.endswith(b"\\/luma\\/callback\\/" + REDACTED.encode() + b'"}}')


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        pytest.param(
            f"https://example.com/cb?token={TOKEN}&empty=&flag",
            f"https://example.com/cb?token={REDACTED}&empty=&flag=",
            id="blank-values-kept",
        ),
        pytest.param(
            f"https://example.com/cb?token={TOKEN}&next=https://a.example/b",
            f"https://example.com/cb?token={REDACTED}&next=https://a.example/b",
            id="slashes-and-colons-left-unescaped",
        ),
        pytest.param(
            f"https://bridge:p@ss{TOKEN}@example.com/cb",
            f"https://bridge:{REDACTED}@example.com/cb",
            id="password-holding-an-at-sign",
        ),
        pytest.param(
            f"https://bridge:pa:ss{TOKEN}@example.com/cb",
            f"https://bridge:{REDACTED}@example.com/cb",
            id="password-holding-a-colon",
        ),
        pytest.param(
            f"https://example.com/luma/callback/{TOKEN}/luma/callback/tail",
            f"https://example.com/luma/callback/{REDACTED}/luma/callback/tail",
            id="the-first-callback-path-is-the-bridges",
        ),
        pytest.param(
            f"https://example.com/luma/callback/{TOKEN}/extra/more",
            f"https://example.com/luma/callback/{REDACTED}/extra/more",
            id="only-the-segment-after-the-path",
        ),
        # The bridge routes on the decoded path, so an encoded path still carries a token
        # that works: it is redacted, and the path is kept as it was written.
        pytest.param(
            f"https://example.com/luma/%63allback/{TOKEN}",
            f"https://example.com/luma/%63allback/{REDACTED}",
            id="a-percent-encoded-path",
        ),
        pytest.param(
            "https://example.com/hooks/luma/callback/s3cr3t%2Dt0ken?x=1",
            f"https://example.com/hooks/luma/callback/{REDACTED}?x=1",
            id="a-percent-encoded-token",
        ),
    ],
)
def test_the_token_and_only_the_token_is_redacted(url: str, redacted: str) -> None:
    assert redact_url_token(url, PATH) == redacted


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://example.com/cb?x=1&flag&a+b=c%20d", id="a-query-without-a-token"),
        pytest.param("https://bridge@example.com/cb", id="a-user-without-a-password"),
        pytest.param("https://example.com/notluma/callback/keep", id="a-longer-segment"),
    ],
)
def test_a_url_without_a_token_is_returned_as_it_was(url: str) -> None:
    assert redact_url_token(url, PATH) == url


def test_a_configured_path_that_urls_must_encode_is_matched_encoded() -> None:
    url = f"https://example.com/hooks/l%C3%BCma%20cb/{TOKEN}"
    assert (
        redact_url_token(url, "/hooks/lüma cb")
        == f"https://example.com/hooks/l%C3%BCma%20cb/{REDACTED}"
    )


@pytest.mark.parametrize("path", ["/hooks/luma", "/hooks/LUMAX", "/X"])
def test_the_token_after_any_configured_path_is_redacted(path: str) -> None:
    url = f"https://example.com{path}/{TOKEN}"
    assert redact_url_token(url, path) == f"https://example.com{path}/{REDACTED}"
    body = json.dumps({"request": {"callback_url": url}}).encode()
    assert redact_raw_token(body, path) == body.replace(TOKEN.encode(), REDACTED.encode())


def test_the_dead_letter_of_a_refused_record_keeps_its_reception_time() -> None:
    headers = [("luma-state", b"completed"), ("luma-received-at", b"2026-11-28T10:00:00.000Z")]
    assert refused_record_letter_headers(headers, "t.completed", "MessageSizeTooLargeError") == [
        (
            "luma-error",
            b"Kafka refused the record for good on t.completed: MessageSizeTooLargeError",
        ),
        ("luma-received-at", b"2026-11-28T10:00:00.000Z"),
    ]
    assert refused_record_letter_headers([], "t.lifecycle", "E")[1] == ("luma-received-at", b"")


@pytest.mark.parametrize(
    "written",
    [
        "/luma/%63allback/",  # a character percent-encoded: the bridge routes it all the same
        "/%6C%75ma/callback/",  # upper-case hexadecimal digits
        "/luma/\\u0063allback/",  # JSON-escaped in the body
        "\\/luma\\/%63allback\\/",  # and slashes escaped as JSON allows
    ],
)
def test_a_dead_letter_loses_the_token_however_the_path_is_written(written: str) -> None:
    body = ('{"state":7,"request":{"callback_url":"https://example.com' + written).encode()
    body += TOKEN.encode() + b'"}}'
    evidence = redact_raw_token(body, PATH)
    assert TOKEN.encode() not in evidence
    assert evidence == body.replace(TOKEN.encode(), REDACTED.encode())


def test_a_dead_letter_loses_the_token_after_a_path_that_urls_must_encode() -> None:
    for written in ("/hooks/l%C3%BCma%20cb/", "/hooks/l%c3%bcma%20cb/", "/hooks/l\\u00fcma cb/"):
        body = ('{"state":7,"u":"https://example.com' + written + TOKEN + '"}').encode()
        assert redact_raw_token(body, "/hooks/lüma cb") == body.replace(
            TOKEN.encode(), REDACTED.encode()
        )


@pytest.mark.parametrize("query", ["?token=", "?%74oken=", "&t%6Fken=", "\\u0026token="])
def test_a_dead_letter_loses_a_query_token_however_its_name_is_written(query: str) -> None:
    body = ('{"state":7,"u":"https://example.com/cb?a=1' + query + TOKEN + '&b=2"}').encode()
    assert redact_raw_token(body, PATH) == body.replace(TOKEN.encode(), REDACTED.encode())


def test_a_dead_letter_without_the_path_or_a_token_query_keeps_every_byte() -> None:
    body = (
        '{"u":"https://example.com/luma/callbacks/' + TOKEN + "?tokens=" + TOKEN + '"}'
    ).encode()
    assert redact_raw_token(body, PATH) == body


def test_a_dead_letter_loses_the_token_after_a_path_beyond_the_basic_plane() -> None:
    path = "/hooks/\U0001f3acmu cb"  # JSON escapes the clapper board as a surrogate pair
    url = f"https://example.com{path}/{TOKEN}"
    for body in (
        json.dumps({"u": url}).encode(),  # \ud83c\udfac
        json.dumps({"u": url}, ensure_ascii=False).encode(),
        json.dumps({"u": f"https://example.com/hooks/%F0%9F%8E%ACmu%20cb/{TOKEN}"}).encode(),
    ):
        assert redact_raw_token(body, path) == body.replace(TOKEN.encode(), REDACTED.encode())
    assert b"\\ud83c\\udfac" in json.dumps({"u": url}).encode()
