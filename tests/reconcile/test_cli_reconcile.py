"""`luma-kafka-bridge reconcile` and `fake-luma` through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys

KEY = "luma-cli-test-key-93b1e0c7"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LUMA_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_reconcile_without_a_key_exits_2_naming_the_variable() -> None:
    result = run("reconcile")
    assert result.returncode == 2
    assert "LUMA_BRIDGE_LUMA_API_KEY is required by `reconcile`" in result.stderr


def test_reconcile_without_kafka_says_what_to_check_and_never_the_key() -> None:
    result = run(
        "reconcile",
        LUMA_BRIDGE_LUMA_API_KEY=KEY,
        LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
        LUMA_BRIDGE_ADMIN_PORT="0",
        LUMA_BRIDGE_LOG_LEVEL="DEBUG",
    )
    assert result.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in result.stderr
    assert "LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS" in result.stderr
    assert KEY not in result.stderr + result.stdout


def test_reconcile_flags_are_the_settings() -> None:
    result = run("reconcile", "--help")
    assert result.returncode == 0
    for flag in ("--luma-api-key", "--public-url", "--reconcile-after-seconds"):
        assert flag in result.stdout


def test_fake_luma_refuses_a_bad_ratio() -> None:
    result = run(
        "fake-luma", "--api-key", "k", "--port", "0", "--send-to", "http://x", "--drop-ratio", "2"
    )
    assert result.returncode == 2
    assert "drop_ratio must be between 0 and 1" in result.stderr
