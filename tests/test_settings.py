"""Settings: environment and flags, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.settings import SettingsError, load_settings
from tests.helpers import child_environment


def test_tokens_and_topic_configs_come_as_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_BRIDGE_AUTH_TOKENS", "alpha, beta,,")
    monkeypatch.setenv("LUMA_BRIDGE_TOPIC_CONFIGS", "retention.ms=1000,min.insync.replicas=2")
    settings = load_settings()
    assert settings.token_values() == (b"alpha", b"beta")
    assert settings.topic_configs == {"retention.ms": "1000", "min.insync.replicas": "2"}


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_BRIDGE_PORT", "9000")
    assert load_settings(port="9100").port == 9100


def test_secrets_stay_out_of_repr_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_BRIDGE_AUTH_TOKENS", "hunter2-secret")
    assert "hunter2" not in repr(load_settings())
    with pytest.raises(SettingsError) as raised:
        load_settings(kafka_security_protocol="SASL_SSL", kafka_sasl_password="pw-secret")
    assert "pw-secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LUMA_BRIDGE_PORT", "eighty"),
        ("LUMA_BRIDGE_KAFKA_ACK_TIMEOUT", "6"),
        ("LUMA_BRIDGE_CALLBACK_PATH", "no-slash"),
        ("LUMA_BRIDGE_KAFKA_COMPRESSION_TYPE", "brotli"),
    ],
)
def test_a_bad_value_stops_start_up_with_exit_2_naming_the_variable(
    variable: str, value: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env=child_environment(**{variable: value, "PATH": ""}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert value not in lines[0]


def test_serve_refuses_to_start_without_tokens() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--kafka-bootstrap-servers", "127.0.0.1:1"],
        env=child_environment(PATH=""),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "LUMA_BRIDGE_AUTH_TOKENS" in result.stderr
    assert "LUMA_BRIDGE_ALLOW_UNAUTHENTICATED" in result.stderr


@pytest.mark.parametrize("level", ["debug", "Debug", "DEBUG"])
def test_log_level_is_accepted_in_any_case(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_BRIDGE_LOG_LEVEL", level)
    assert load_settings().log_level == "DEBUG"


def test_cloudevents_are_on_by_default_and_switch_off() -> None:
    on = load_settings().cloudevents_options()
    assert (on.enabled, on.source) == (True, "https://api.lumalabs.ai/dream-machine/v1")
    assert not load_settings(cloudevents="false").cloudevents_options().enabled
    with pytest.raises(SettingsError, match="LUMA_BRIDGE_CLOUDEVENTS_SOURCE"):
        load_settings(cloudevents_source="not a uri")


VERIFY_KEY = "luma-settings-test-key-3e9a7c"


def run_serve(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--allow-unauthenticated", "true", *flags],
        env=child_environment(PATH="", LUMA_BRIDGE_LUMA_API_KEY=VERIFY_KEY),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_verification_past_lumas_deadline_stops_start_up_with_one_line() -> None:
    """VERIFY_TIMEOUT + KAFKA_ACK_TIMEOUT must leave the answer inside Luma's 5 s."""
    result = run_serve("--verify", "enforce", "--verify-timeout", "1")  # + the default ack 4 s
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "LUMA_BRIDGE_VERIFY_TIMEOUT" in lines[0]
    assert "LUMA_BRIDGE_KAFKA_ACK_TIMEOUT" in lines[0]
    assert "below" in lines[0]
    assert VERIFY_KEY not in result.stderr + result.stdout
    assert run_serve("--verify", "tag", "--kafka-ack-timeout", "4.5").returncode == 2


def test_verification_needs_the_api_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--verify", "tag", "--kafka-ack-timeout", "3"],
        env=child_environment(PATH=""),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "LUMA_BRIDGE_LUMA_API_KEY" in result.stderr


def test_verification_settings_and_their_bounds() -> None:
    assert load_settings().verify == "off"
    # Off: no key, and the deadline check does not apply.
    assert load_settings(verify="off", verify_timeout=2.0, kafka_ack_timeout=4.0).verify == "off"
    on = load_settings(verify="enforce", luma_api_key=VERIFY_KEY, kafka_ack_timeout=3.0)
    assert (on.verify_timeout, on.verify_fallback) == (1.0, "reject")
    assert VERIFY_KEY not in repr(on)
    for bad in ({"verify": "strict"}, {"verify_timeout": 0}, {"verify_timeout": 5}):
        with pytest.raises(SettingsError):
            load_settings(luma_api_key=VERIFY_KEY, **bad)
    with pytest.raises(SettingsError, match="LUMA_BRIDGE_VERIFY_FALLBACK"):
        load_settings(verify_fallback="maybe")
