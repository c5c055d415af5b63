"""Callback verification in the chart: `settings.verify` turns it on, the bridge pods read the
Luma API key from the reconciler's Secret, and settings past Luma's 5 s fail at render time."""

from __future__ import annotations

import os
from typing import Any

import pytest

from bridge.settings import load_settings
from tests.deploy.rendering import container_env, load_value_set, need, render, workload

KEY = "luma-chart-test-key-0a1b2c"


def verifying(**settings: Any) -> dict[str, Any]:
    values = load_value_set("minimal")
    values["settings"] = {**values.get("settings", {}), **settings}
    values["reconciler"] = {"apiKeySecret": {"name": "luma-api"}}
    return values


def bridge_env(values: dict[str, Any]) -> dict[str, str]:
    manifests = render(values)
    (container,) = workload(manifests)["spec"]["template"]["spec"]["containers"]
    env = {entry["name"]: entry for entry in container.get("env", [])}
    if "LUMA_BRIDGE_LUMA_API_KEY" in env:
        ref = env["LUMA_BRIDGE_LUMA_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "luma-api", "key": "api-key"}
    return container_env(manifests, container, secrets={"api-key": KEY})


def test_enforce_gives_the_bridge_the_key_from_the_secret_and_settings_that_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = bridge_env(verifying(verify="enforce", kafkaAckTimeout=3, verifyFallback="accept"))
    assert env["LUMA_BRIDGE_VERIFY"] == "enforce"
    for name in [n for n in os.environ if n.startswith("LUMA_BRIDGE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert (settings.verify, settings.verify_fallback) == ("enforce", "accept")
    assert settings.luma_api_key is not None
    assert settings.luma_api_key.get_secret_value() == KEY


def test_off_by_default_the_bridge_gets_no_key() -> None:
    env = bridge_env(load_value_set("minimal"))
    assert "LUMA_BRIDGE_LUMA_API_KEY" not in env
    assert "LUMA_BRIDGE_VERIFY" not in env


def test_verification_needs_the_secret_and_a_shorter_ack_timeout() -> None:
    helm = need("helm_python")
    values = verifying(verify="tag", kafkaAckTimeout=3)
    values["reconciler"] = {"apiKeySecret": {"name": ""}}
    with pytest.raises(helm.HelmError, match=r"settings\.verify needs the Luma API key"):
        render(values)
    with pytest.raises(helm.HelmError, match=r"must stay below Luma's 5 s"):
        render(verifying(verify="tag"))  # the default ack timeout, 4 s, plus 1 s
    with pytest.raises(helm.HelmError, match=r"must stay below Luma's 5 s"):
        render(verifying(verify="enforce", kafkaAckTimeout=3, verifyTimeout=2))


def test_the_network_policy_lets_a_verifying_bridge_reach_lumas_api() -> None:
    https = {"ports": [{"port": 443, "protocol": "TCP"}]}

    def bridge_egress(values: dict[str, Any]) -> list[Any]:
        values["networkPolicy"] = {"enabled": True}
        (policy,) = [
            m
            for m in render(values)
            if m["kind"] == "NetworkPolicy"
            and m["metadata"]["labels"].get("app.kubernetes.io/component") != "reconciler"
        ]
        egress: list[Any] = policy["spec"]["egress"]
        return egress

    assert https in bridge_egress(verifying(verify="tag", kafkaAckTimeout=3))
    assert https not in bridge_egress(load_value_set("minimal"))
