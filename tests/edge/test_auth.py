"""Who gets in, through the public app: each accepted token wherever Luma may put it, and
the near misses (a valid token with more after it, a prefix of one) nowhere; and the
tokens file's bounds and reloads."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from prometheus_client import CollectorRegistry

from bridge.edge import auth as auth_module
from bridge.edge.auth import (
    MAX_TOKEN_FILE_BYTES,
    Authenticator,
    TokenAuth,
    TokenFileError,
    read_token_file,
)
from bridge.edge.signing import SignatureCheck, sign
from bridge.ops.metrics import Metrics
from bridge.server import callback_app
from bridge.settings import load_settings
from tests.edge.support import SEED_BODY
from tests.helpers import MemoryPublisher

TOKENS = ("first-token-0123456789", "second-token-abcdefgh", "third-token-ZYXWVUTS")
BASE = "/luma/callback"


class App:
    def __init__(self, client: TestClient[Any, Any], publisher: MemoryPublisher) -> None:
        self.client = client
        self.publisher = publisher

    async def status(self, where: str, token: str) -> int:
        """POST the seed callback with `token` in the path, the query or a Bearer header."""
        path, params, headers = BASE, {}, {"Content-Type": "application/json"}
        if where == "path":
            path = f"{BASE}/{token}"
        elif where == "query":
            params = {"token": token}
        else:
            headers["Authorization"] = f"Bearer {token}"
        response = await self.client.post(path, data=SEED_BODY, params=params, headers=headers)
        await response.read()
        return response.status


@pytest.fixture
async def app() -> AsyncIterator[App]:
    settings = load_settings(auth_tokens=",".join(TOKENS), topic_prefix="t", spool_enabled=False)
    publisher = MemoryPublisher()
    client = TestClient(
        TestServer(
            callback_app(settings, publisher=publisher, metrics=Metrics(CollectorRegistry()))
        )
    )
    await client.start_server()
    try:
        yield App(client, publisher)
    finally:
        await client.close()


WHERE = ["path", "query", "bearer"]


@pytest.mark.parametrize("where", WHERE)
async def test_each_accepted_token_is_accepted(app: App, where: str) -> None:
    for n, token in enumerate(TOKENS):
        assert await app.status(where, token) == 200, f"token {n} refused in the {where}"
    assert len(app.publisher.records) == 2  # one callback; the retries are duplicates


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize(
    "near_miss",
    [
        pytest.param(TOKENS[0] + "x", id="valid-token-with-a-suffix"),
        pytest.param(TOKENS[1] + TOKENS[2], id="two-valid-tokens-joined"),
        pytest.param(TOKENS[0][:-1], id="prefix-of-a-valid-token"),
        pytest.param(TOKENS[2][1:], id="suffix-of-a-valid-token"),
        pytest.param(TOKENS[0].upper(), id="other-case"),
        pytest.param("x" + TOKENS[1], id="valid-token-after-a-prefix"),
    ],
)
async def test_a_near_miss_is_refused(app: App, where: str, near_miss: str) -> None:
    assert await app.status(where, near_miss) == 401
    assert app.publisher.records == []


async def test_a_bearer_scheme_is_matched_case_insensitively_and_others_are_ignored(
    app: App,
) -> None:
    async def with_authorization(value: str) -> int:
        response = await app.client.post(
            BASE,
            data=SEED_BODY,
            headers={"Content-Type": "application/json", "Authorization": value},
        )
        await response.read()
        return response.status

    assert await with_authorization(f"bearer {TOKENS[0]}") == 200
    assert await with_authorization(f"Basic {TOKENS[0]}") == 401
    assert await with_authorization(f"Bearer{TOKENS[0]}") == 401
    assert await with_authorization("Bearer ") == 401


async def test_no_token_at_all_is_refused(app: App) -> None:
    response = await app.client.post(
        BASE, data=SEED_BODY, headers={"Content-Type": "application/json"}
    )
    assert response.status == 401
    assert app.publisher.records == []


# The tokens file: its bounds, and what reload() says and logs.


def test_a_tokens_file_of_exactly_the_size_limit_is_read_and_a_larger_one_refused(
    tmp_path: Path,
) -> None:
    source = tmp_path / "tokens"
    token = b"t" * 100
    padding = b"#" * (MAX_TOKEN_FILE_BYTES - len(token) - 1) + b"\n"
    source.write_bytes(padding + token)
    assert source.stat().st_size == MAX_TOKEN_FILE_BYTES
    assert read_token_file(source) == (token,)
    source.write_bytes(padding + token + b"x")
    with pytest.raises(TokenFileError) as raised:
        read_token_file(source)
    assert str(raised.value) == (
        f"LUMA_BRIDGE_AUTH_TOKENS_FILE ({source}) is larger than {MAX_TOKEN_FILE_BYTES} bytes"
    )


def test_a_missing_tokens_file_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(TokenFileError) as raised:
        read_token_file(missing)
    assert str(raised.value) == (
        f"cannot read LUMA_BRIDGE_AUTH_TOKENS_FILE ({missing}): No such file or directory"
    )


def test_without_a_tokens_file_reload_changes_nothing() -> None:
    tokens = TokenAuth((b"fixed",), allow_unauthenticated=False)
    assert not tokens.reload()
    assert tokens.count == 1


def fields_of(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [
        getattr(record, "fields", {})
        for record in caplog.records
        if record.name == "bridge.edge.auth" and record.getMessage() == message
    ]


def test_reload_reads_the_file_only_when_it_changed_and_says_what_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "tokens"
    source.write_text("one\n")
    tokens = TokenAuth((b"fixed",), allow_unauthenticated=False, tokens_file=source)
    reads = 0
    read = auth_module.read_token_file

    def counting_read(path: Path) -> tuple[bytes, ...]:
        nonlocal reads
        reads += 1
        return read(path)

    monkeypatch.setattr(auth_module, "read_token_file", counting_read)
    caplog.set_level(logging.INFO, logger="bridge.edge.auth")

    assert not tokens.reload()  # unchanged: not even read
    assert reads == 0
    source.write_text("one\n")
    os.utime(source, ns=(0, 10**9))  # rewritten, same tokens
    assert not tokens.reload()
    assert reads == 1
    assert not tokens.reload()
    assert reads == 1
    os.utime(source, ns=(0, 2 * 10**9))  # and again: still the same tokens
    assert not tokens.reload()
    assert reads == 2
    assert fields_of(caplog, "tokens reloaded") == []

    source.write_text("one,two\n")
    assert tokens.reload()
    assert tokens.count == 3
    assert fields_of(caplog, "tokens reloaded") == [{"tokens": 3}]
    assert fields_of(caplog, "no tokens accepted: every callback is answered 401") == []


def test_a_tokens_file_emptied_is_warned_about_and_an_unreadable_one_keeps_the_old_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "tokens"
    source.write_text("one\n")
    tokens = TokenAuth((), allow_unauthenticated=False, tokens_file=source)
    caplog.set_level(logging.INFO, logger="bridge.edge.auth")
    source.write_text("# nothing\n")
    assert tokens.reload()
    assert tokens.count == 0
    assert fields_of(caplog, "no tokens accepted: every callback is answered 401") == [{}]
    source.write_text("two\n")
    assert tokens.reload()
    source.unlink()
    assert not tokens.reload()
    assert tokens.count == 1
    reason = f"cannot read LUMA_BRIDGE_AUTH_TOKENS_FILE ({source}): No such file or directory"
    assert fields_of(caplog, "keeping the previous tokens") == [{"reason": reason}]


async def test_a_bearer_token_after_more_than_one_space_is_still_found(app: App) -> None:
    response = await app.client.post(
        BASE,
        data=SEED_BODY,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer  {TOKENS[1]}"},
    )
    assert response.status == 200


def test_a_token_is_required_unless_explicitly_not_and_always_with_a_tokens_file(
    tmp_path: Path,
) -> None:
    source = tmp_path / "tokens"
    source.write_text("one\n")
    assert TokenAuth((), allow_unauthenticated=False).required
    assert TokenAuth((b"t",), allow_unauthenticated=True).required
    assert TokenAuth((), allow_unauthenticated=True, tokens_file=source).required
    assert not TokenAuth((), allow_unauthenticated=True).required


def test_a_tokens_file_that_never_ends_is_refused_once_past_the_limit(tmp_path: Path) -> None:
    """A pipe (or a device) as AUTH_TOKENS_FILE: read up to one byte past the limit and
    refused, not read to an end that may never come."""
    fifo = tmp_path / "tokens"
    os.mkfifo(fifo)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        reading = pool.submit(read_token_file, fifo)
        # Opening the write end waits for the reader; the writer then stays open (no EOF).
        with fifo.open("wb") as writer:
            writer.write(b"t" * (MAX_TOKEN_FILE_BYTES + 1))
            writer.flush()
            try:
                with pytest.raises(TokenFileError) as raised:
                    reading.result(timeout=10)
            finally:
                writer.close()  # the reader, if still blocked, gets its end of file
    assert "is larger than" in str(raised.value)


def signed(body: bytes, webhook_id: str) -> web.Request:
    timestamp = int(time.time())
    return make_mocked_request(
        "POST",
        "/luma/callback",
        headers={
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(b"k" * 32, webhook_id, timestamp, body),
        },
    )


def test_a_released_webhook_id_is_claimed_afresh_by_the_senders_retry() -> None:
    auth = Authenticator(
        TokenAuth((), allow_unauthenticated=True),
        signatures=SignatureCheck((b"k" * 32,), tolerance=300),
    )
    first = auth.verify_body(signed(SEED_BODY, "msg_1"), SEED_BODY)
    assert (first.authorized, first.webhook_id, first.repeat) == (True, "msg_1", False)
    kept = auth.verify_body(signed(SEED_BODY, "msg_2"), SEED_BODY)
    assert not kept.repeat
    auth.release(first)  # answered 503: the sender will retry msg_1
    retried = auth.verify_body(signed(SEED_BODY, "msg_1"), SEED_BODY)
    assert (retried.authorized, retried.repeat) == (True, False)
    # An id not released is still remembered: its retry is a repeat.
    again = auth.verify_body(signed(SEED_BODY, "msg_2"), SEED_BODY)
    assert (again.authorized, again.repeat) == (True, True)
