"""Secrets hygiene in-process: every log line (DEBUG, every logger, formatted as in
production) and every metric is grepped for the configured secrets."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.ops.logs import JsonFormatter, TextFormatter
from bridge.settings import SettingsError, load_settings
from tests.edge.support import HMAC_SECRET, request_bytes, running_edge, send_raw
from tests.helpers import TOKEN

FILE_TOKEN = "file-token-abcdefghijklmnop"


class Capture(logging.Handler):
    """Every record, formatted both ways the bridge can log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(JsonFormatter().format(record))
        self.lines.append(TextFormatter().format(record))


@pytest.fixture
def captured() -> Iterator[Capture]:
    capture = Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


async def test_no_secret_reaches_a_log_line_or_a_metric(captured: Capture, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(FILE_TOKEN)
    secrets = (TOKEN, FILE_TOKEN, HMAC_SECRET, HMAC_SECRET.removeprefix("whsec_"))
    async with running_edge(auth_tokens_file=str(tokens), hmac_secrets=HMAC_SECRET) as edge:
        hostile = [
            request_bytes(),  # unsigned: 401
            request_bytes(path=f"/luma/callback/{FILE_TOKEN}?token={TOKEN}"),
            request_bytes(path=f"/elsewhere/{TOKEN}"),
            request_bytes(method="PUT"),
            request_bytes(headers={"X-Big": TOKEN * 1000}),  # 431
            request_bytes(headers={"webhook-signature": f"v1,{HMAC_SECRET}"}),
            f"GARBAGE\x00 /luma/callback/{TOKEN} HTTP/1.1\r\n\r\n".encode(),
            request_bytes(body=b"", headers={"Content-Length": "999999999"}),
        ]
        for data in hostile:
            answer = await send_raw(edge.port, data)
            assert answer.status is not None
            assert answer.status != 500
            assert not any(secret.encode() in answer.body for secret in secrets)
        exposition = edge.exposition()
    assert captured.lines, "nothing was logged: the check would prove nothing"
    for secret in secrets:
        assert not [line for line in captured.lines if secret in line], secret
        assert secret not in exposition


def test_secrets_stay_out_of_settings_repr_and_errors(tmp_path: Path) -> None:
    settings = load_settings(auth_tokens=TOKEN, hmac_secrets=HMAC_SECRET)
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert TOKEN not in text
        assert HMAC_SECRET not in text
    with pytest.raises(SettingsError) as raised:
        load_settings(hmac_secrets=f"{HMAC_SECRET},whsec_short-{TOKEN}")
    assert TOKEN not in str(raised.value)
    assert HMAC_SECRET not in str(raised.value)
