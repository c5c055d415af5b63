"""Access control: allow-list, trusted proxies, signatures, replays, token files, rate limit.

Every failure is the same 401 with the same body; nothing is written for it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from pathlib import Path

import pytest

from bridge.edge.access import SourcePolicy, parse_address
from bridge.edge.auth import read_token_file
from bridge.edge.ratelimit import RateLimiter
from bridge.edge.signing import Claim, ReplayGuard, SignatureCheck, sign
from bridge.ops.logs import FIELDS
from bridge.server import AUTHENTICATOR
from bridge.settings import SettingsError, load_settings
from tests.edge.support import (
    HMAC_KEY,
    HMAC_SECRET,
    SEED_BODY,
    RawAnswer,
    request_bytes,
    running_edge,
    send_raw,
)
from tests.helpers import SEED_COMPLETED_VIDEO, wait_until

UNAUTHORIZED = {"status": "unauthorized", "error": "missing or wrong credentials"}


def signed_headers(
    body: bytes, *, webhook_id: str = "msg_1", at: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if at is None else at)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(HMAC_KEY, webhook_id, timestamp, body),
    }


def unauthorized(answer: RawAnswer) -> bool:
    return answer.status == 401 and json.loads(answer.body) == UNAUTHORIZED


def networks(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7:443 ", "203.0.113.7"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("unknown", None),
        ("", None),
    ],
)
def test_addresses_are_read_as_proxies_write_them(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed else None) == expected


async def test_allow_list_refuses_other_sources_with_the_same_401() -> None:
    async with running_edge(allowed_cidrs="10.0.0.0/8") as edge:
        answer = await send_raw(edge.port, request_bytes())
        assert unauthorized(answer)
        assert edge.publisher.records == []
    async with running_edge(allowed_cidrs="127.0.0.0/8") as edge:
        assert (await send_raw(edge.port, request_bytes())).status == 200


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    spoofed = request_bytes(headers={"X-Forwarded-For": "10.9.9.9"})
    # The peer (127.0.0.1) is not a trusted proxy: its X-Forwarded-For is ignored.
    async with running_edge(allowed_cidrs="10.0.0.0/8") as edge:
        assert unauthorized(await send_raw(edge.port, spoofed))
        assert edge.publisher.records == []
    # Trusted proxy: the nearest untrusted hop is the source.
    async with running_edge(allowed_cidrs="10.0.0.0/8", trusted_proxies="127.0.0.1") as edge:
        assert (await send_raw(edge.port, spoofed)).status == 200
        # A client cannot prepend its way in: the hop the proxy appended is what counts.
        forged = request_bytes(headers={"X-Forwarded-For": "10.9.9.9, 198.51.100.4"})
        assert unauthorized(await send_raw(edge.port, forged))
        garbled = request_bytes(headers={"X-Forwarded-For": "10.9.9.9, not-an-ip"})
        assert unauthorized(await send_raw(edge.port, garbled))


def test_source_walks_past_every_trusted_proxy() -> None:
    policy = SourcePolicy(
        allowed=networks("192.0.2.0/24"), trusted_proxies=networks("10.0.0.0/8", "127.0.0.1")
    )
    assert policy.allows(ipaddress.ip_address("192.0.2.10"))
    assert not policy.allows(None)
    assert not policy.allows(ipaddress.ip_address("2001:db8::1"))
    assert SourcePolicy().allows(None)  # no allow-list: any source


async def test_a_repeated_webhook_id_with_the_same_body_is_a_duplicate_not_a_replay() -> None:
    """Standard Webhooks: the id is the sender's idempotency key. A retry after a lost
    200 carries the same id and body and must get 200 (issue 11: it got 401)."""
    # Event-id dedupe off: the webhook id alone keeps the retry from being written twice.
    async with running_edge(hmac_secrets=HMAC_SECRET, dedupe_window_size=0) as edge:
        good = request_bytes(headers=signed_headers(SEED_BODY))
        first = await send_raw(edge.port, good)
        assert first.status == 200
        again = await send_raw(edge.port, good)  # the same request again
        assert again.status == 200
        assert json.loads(again.body) == {**json.loads(first.body), "duplicate": True}
        assert len(edge.publisher.records) == 2  # per-state and lifecycle, once
        # Another body under a used id is refused.
        other = SEED_BODY.replace(b"completed", b"failed")
        reused = request_bytes(body=other, headers=signed_headers(other))
        assert unauthorized(await send_raw(edge.port, reused))
        assert len(edge.publisher.records) == 2


def test_the_replay_window_counts_ids_it_forgets_early() -> None:
    now = [0.0]
    evicted: list[None] = []
    guard = ReplayGuard(
        ttl=10, size=2, clock=lambda: now[0], on_early_eviction=lambda: evicted.append(None)
    )
    assert guard.claim("a", b"1") is Claim.NEW
    assert guard.claim("a", b"1") is Claim.REPEAT
    assert guard.claim("a", b"2") is Claim.CONFLICT
    guard.claim("b", b"1")
    guard.claim("c", b"1")  # over the size within the window: "a" forgotten early
    assert len(evicted) == 1
    assert guard.claim("a", b"2") is Claim.NEW  # and "b" goes early to make room
    assert len(evicted) == 2
    now[0] = 100.0  # everything expired: forgetting on time is not counted
    guard.claim("d", b"1")
    guard.claim("e", b"1")
    assert len(evicted) == 2
    assert len(guard) == 2


async def test_early_evictions_show_in_the_metric() -> None:
    async with running_edge(hmac_secrets=HMAC_SECRET, hmac_replay_window_size=1) as edge:
        for webhook_id in ("msg_a", "msg_b", "msg_c"):
            body = SEED_BODY.replace(b"completed", webhook_id.encode())
            headers = signed_headers(body, webhook_id=webhook_id)
            assert (
                await send_raw(edge.port, request_bytes(body=body, headers=headers))
            ).status == 200
        assert edge.sample("luma_bridge_webhook_ids_evicted_early_total") == 2


@pytest.mark.parametrize(
    "headers",
    [
        {},  # unsigned
        {"webhook-signature": "v1,AAAA"},
        {"webhook-timestamp": "1"},  # far outside the tolerance
        {"webhook-timestamp": str(int(time.time()) + 3600)},
        {"webhook-id": ""},
        {"webhook-signature": "v2," + "A" * 44},
    ],
)
async def test_every_bad_signature_gets_the_same_401(headers: dict[str, str]) -> None:
    async with running_edge(hmac_secrets=HMAC_SECRET) as edge:
        signed = signed_headers(SEED_BODY, webhook_id=f"msg_{len(headers)}")
        if headers:
            signed.update(headers)
        else:
            signed = {}
        assert unauthorized(await send_raw(edge.port, request_bytes(headers=signed)))
        # A signature over other bytes does not cover these.
        tampered = request_bytes(body=SEED_BODY.replace(b"completed", b"failed"), headers=signed)
        assert unauthorized(await send_raw(edge.port, tampered))
        assert edge.publisher.records == []


async def test_signature_and_token_are_both_required_when_both_are_configured() -> None:
    async with running_edge(hmac_secrets=HMAC_SECRET) as edge:
        wrong_token = request_bytes(path="/luma/callback/wrong", headers=signed_headers(SEED_BODY))
        assert unauthorized(await send_raw(edge.port, wrong_token))
        assert edge.publisher.records == []


async def test_signature_alone_suffices_when_no_token_is_configured() -> None:
    async with running_edge(auth_tokens="", hmac_secrets=HMAC_SECRET) as edge:
        signed = request_bytes(path="/luma/callback", headers=signed_headers(SEED_BODY))
        assert (await send_raw(edge.port, signed)).status == 200
        unsigned = request_bytes(path="/luma/callback")
        assert unauthorized(await send_raw(edge.port, unsigned))


async def test_a_signed_request_answered_503_may_be_retried() -> None:
    async with running_edge(hmac_secrets=HMAC_SECRET) as edge:
        signed = request_bytes(headers=signed_headers(SEED_BODY, webhook_id="msg_retry"))
        edge.publisher.failing = "KafkaTimeoutError"
        assert (await send_raw(edge.port, signed)).status == 503
        edge.publisher.failing = None
        assert (await send_raw(edge.port, signed)).status == 200


def test_signature_check_compares_against_every_secret() -> None:
    old, new = b"o" * 32, b"n" * 32
    check = SignatureCheck((old, new), tolerance=300)
    now = int(time.time())
    for key in (old, new):
        headers = {
            "webhook-id": "m",
            "webhook-timestamp": str(now),
            "webhook-signature": "v1,bogus " + sign(key, "m", now, b"{}"),
        }
        assert check.verify(headers, b"{}").valid


async def test_tokens_file_is_reread_without_a_restart(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    tokens.write_text(f"# rotated by hand\n{old}\n")
    async with running_edge(auth_tokens="", auth_tokens_file=str(tokens)) as edge:
        token_auth = edge.runner.app[AUTHENTICATOR].tokens
        assert (
            await send_raw(edge.port, request_bytes(path=f"/luma/callback/{old}"))
        ).status == 200
        tokens.write_text(f"{old},{new}\n")
        # What the server's file watcher calls every FILE_RELOAD_SECONDS.
        await wait_until(token_auth.reload, what="tokens file change noticed", timeout=5)
        other = SEED_BODY.replace(b"d1ad97c4", b"aaaaaaaa")
        answer = await send_raw(edge.port, request_bytes(path=f"/luma/callback/{new}", body=other))
        assert answer.status == 200
        tokens.write_text(f"{new}\n")
        await wait_until(token_auth.reload, what="old token removed", timeout=5)
        assert unauthorized(await send_raw(edge.port, request_bytes(path=f"/luma/callback/{old}")))
        tokens.unlink()  # a missing file keeps the last tokens read
        assert not token_auth.reload()
        assert token_auth.count == 1


def test_tokens_file_format(tmp_path: Path) -> None:
    source = tmp_path / "tokens"
    source.write_bytes(b"# comment\r\n a-token , b-token\n\n\nc-token\n")
    assert read_token_file(source) == (b"a-token", b"b-token", b"c-token")


async def test_rate_limit_answers_429_per_source_and_never_writes() -> None:
    async with running_edge(rate_limit_per_second=0.5, rate_limit_burst=2) as edge:
        statuses = [(await send_raw(edge.port, request_bytes())).status for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        answer = await send_raw(edge.port, request_bytes())
        assert answer.headers["retry-after"] == "2"
        assert json.loads(answer.body) == {
            "status": "rejected",
            "error": "too many requests from this source",
        }
        assert edge.sample("luma_bridge_callbacks_total", state="none", outcome="rejected") == 3


def test_rate_limiter_refills_and_forgets_the_least_recent_source() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1, burst=1, max_sources=2, clock=lambda: now[0])
    assert limiter.allow("a")
    assert not limiter.allow("a")
    now[0] = 1.0
    assert limiter.allow("a")
    limiter.allow("b")
    limiter.allow("c")
    assert len(limiter) == 2


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"allowed_cidrs": "10.0.0.1/8"}, "LUMA_BRIDGE_ALLOWED_CIDRS"),
        ({"trusted_proxies": "proxy.local"}, "LUMA_BRIDGE_TRUSTED_PROXIES"),
        ({"hmac_secrets": "hunter2-not-standard"}, "LUMA_BRIDGE_HMAC_SECRETS"),
        ({"hmac_secrets": "whsec_" + "A" * 8}, "LUMA_BRIDGE_HMAC_SECRETS"),
        ({"tls_cert_file": "/etc/cert.pem"}, "LUMA_BRIDGE_TLS_KEY_FILE"),
        ({"max_headers": 2}, "LUMA_BRIDGE_MAX_HEADERS"),
    ],
)
def test_bad_security_settings_stop_start_up_naming_the_variable(
    overrides: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(**overrides)
    message = str(raised.value)
    assert variable in message
    assert "hunter2" not in message
    assert len(message.splitlines()) == 1


async def test_a_signed_empty_body_is_verified_over_the_empty_body() -> None:
    async with running_edge(hmac_secrets=HMAC_SECRET) as edge:
        empty = request_bytes(body=b"", headers=signed_headers(b"", webhook_id="msg_empty"))
        answer = await send_raw(edge.port, empty)
        assert answer.status == 400  # authenticated, then refused as not JSON


async def test_the_rate_limit_is_kept_per_source_behind_a_trusted_proxy() -> None:
    async with running_edge(
        rate_limit_per_second=0.5, rate_limit_burst=1, trusted_proxies="127.0.0.1/32"
    ) as edge:

        async def from_source(address: str) -> RawAnswer:
            headers = {"X-Forwarded-For": address}
            return await send_raw(edge.port, request_bytes(headers=headers))

        first = await from_source("203.0.113.1")
        assert first.status == 200
        assert "retry-after" not in first.headers
        assert (await from_source("203.0.113.1")).status == 429
        assert (await from_source("203.0.113.2")).status == 200


async def test_a_webhook_retry_under_a_custom_callback_path_is_the_same_redacted_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry of a written callback is parsed as the first was (its write token in
    `request.callback_url` redacted under the configured path): a duplicate of the same
    event id, counted by state, logged without a reason, and not written again."""
    token = "custom-path-token-0123456789"
    value = {
        **SEED_COMPLETED_VIDEO,
        "request": {
            **SEED_COMPLETED_VIDEO["request"],
            "callback_url": f"https://bridge.example.com/hooks/luma/{token}",
        },
    }
    body = json.dumps(value).encode()
    caplog.set_level(logging.INFO, logger="bridge.edge.http")
    async with running_edge(
        hmac_secrets=HMAC_SECRET,
        auth_tokens=token,
        callback_path="/hooks/luma",
        dedupe_window_size=0,
    ) as edge:
        request = request_bytes(
            path=f"/hooks/luma/{token}", body=body, headers=signed_headers(body)
        )
        first = await send_raw(edge.port, request)
        assert first.status == 200, first.body
        again = await send_raw(edge.port, request)
        assert again.status == 200, again.body
        assert json.loads(again.body) == {**json.loads(first.body), "duplicate": True}
        assert len(edge.publisher.records) == 2  # per-state and lifecycle, once
        assert token.encode() not in edge.publisher.records[0].value
        assert edge.sample("luma_bridge_duplicate_deliveries_total", state="completed") == 1
    lines = [
        record.__dict__[FIELDS]
        for record in caplog.records
        if record.name == "bridge.edge.http" and record.getMessage() == "callback"
    ]
    assert [line["outcome"] for line in lines] == ["accepted", "duplicate"]
    assert "reason" not in lines[1]


async def test_a_signed_callback_answered_503_is_taken_on_the_senders_retry() -> None:
    """Kafka down: the signed callback is answered 503 for the pipeline's reason (its
    webhook id given back, not an internal error); the retry with the same id and body,
    once Kafka is back, is accepted and written once."""
    async with running_edge(hmac_secrets=HMAC_SECRET, dedupe_window_size=0) as edge:
        request = request_bytes(headers=signed_headers(SEED_BODY))
        edge.publisher.failing = "KafkaTimeoutError"
        first = await send_raw(edge.port, request)
        assert first.status == 503
        assert json.loads(first.body) == {
            "status": "unavailable",
            "error": "Kafka unavailable: KafkaTimeoutError; retry later",
        }
        edge.publisher.failing = None
        retried = await send_raw(edge.port, request)
        assert retried.status == 200
        assert "duplicate" not in json.loads(retried.body)
        assert len(edge.publisher.records) == 2


async def test_a_source_that_cannot_be_told_is_logged_as_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without an allow-list such a callback is taken; its log line says the source is
    unknown, and a known one is logged as its address."""
    caplog.set_level(logging.INFO, logger="bridge.edge.http")
    async with running_edge(trusted_proxies="127.0.0.1") as edge:
        garbled = request_bytes(headers={"X-Forwarded-For": "not-an-ip"})
        assert (await send_raw(edge.port, garbled)).status == 200
        forwarded = request_bytes(headers={"X-Forwarded-For": "192.0.2.7"})
        assert (await send_raw(edge.port, forwarded)).status == 200
    sources = [
        record.__dict__[FIELDS]["source"]
        for record in caplog.records
        if record.name == "bridge.edge.http" and record.getMessage() == "callback"
    ]
    assert sources == ["unknown", "192.0.2.7"]
