"""The reconciler in the chart: off by default, one Deployment of its own when enabled, the API
key from a Secret, its own probes, Service and ServiceMonitor, settings the reconciler reads."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.reconcile.service import require_api_key
from bridge.settings import load_settings
from tests.deploy.rendering import (
    Manifest,
    container_env,
    load_value_set,
    need,
    of_kind,
    render,
    value_set_names,
    workload,
)

COMPONENT = "app.kubernetes.io/component"


def reconciler_parts(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in manifests if m["metadata"]["labels"].get(COMPONENT) == "reconciler"]


def the(manifests: list[Manifest], kind: str) -> Manifest:
    (found,) = [m for m in reconciler_parts(manifests) if m["kind"] == kind]
    return found


@pytest.mark.parametrize("value_set", [n for n in value_set_names() if n != "reconciler"])
def test_off_unless_enabled(value_set: str) -> None:
    assert reconciler_parts(render(load_value_set(value_set))) == []


def test_enabled_renders_its_own_deployment_service_and_monitor() -> None:
    manifests = render(load_value_set("reconciler"))
    kinds = sorted(m["kind"] for m in reconciler_parts(manifests))
    assert kinds == ["Deployment", "NetworkPolicy", "Service", "ServiceMonitor"]
    deployment = the(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["reconcile"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The bridge's workload does not select the reconciler's pods, nor the other way round.
    bridge = workload(manifests)
    assert not bridge["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_api_key_comes_from_the_secret_and_no_callback_token_does() -> None:
    manifests = render(load_value_set("reconciler"))
    (container,) = the(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    key = env["LUMA_BRIDGE_LUMA_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key == {"name": "luma-api", "key": "api-key"}
    assert "LUMA_BRIDGE_AUTH_TOKENS" not in env


def test_the_reconciler_reads_its_settings_from_the_rendered_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    manifests = render(load_value_set("reconciler"))
    deployment = the(manifests, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for name in list(os.environ):
        if name.startswith("LUMA_BRIDGE_"):
            monkeypatch.delenv(name)
    for name, value in container_env(manifests, container).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    require_api_key(settings)
    assert settings.public_url == "https://luma-bridge.example.com/luma/callback"
    assert settings.reconcile_after_seconds == 900
    assert settings.luma_api_rate_limit == 2.5
    assert settings.kafka_bootstrap_servers == "kafka-0.kafka:9092"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"admin": settings.admin_port}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}


@pytest.mark.parametrize("shutdown_timeout", [25, 60.5])
def test_the_kubelet_waits_out_its_shutdown_timeout(shutdown_timeout: float) -> None:
    """Its stop is bounded by the shutdown timeout; a kill before it loses the saved state."""
    values = load_value_set("reconciler")
    values.setdefault("lifecycle", {})["shutdownTimeoutSeconds"] = shutdown_timeout
    manifests = render(values)
    pod = the(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    environment = container_env(manifests, container)
    assert float(environment["LUMA_BRIDGE_SHUTDOWN_TIMEOUT"]) == shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > shutdown_timeout


def test_its_service_monitor_scrapes_only_the_reconciler() -> None:
    manifests = render(load_value_set("reconciler"))
    service = the(manifests, "Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["admin"]
    pod_labels = the(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for monitor in of_kind(manifests, "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        selected = [
            s for s in of_kind(manifests, "Service") if wanted <= s["metadata"]["labels"].items()
        ]
        assert len(selected) == 1
        mine = monitor["metadata"]["labels"].get(COMPONENT) == "reconciler"
        assert (selected[0] is service) == mine
    assert the(manifests, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "admin"


def test_its_network_policy_lets_it_reach_lumas_api() -> None:
    policy = the(render(load_value_set("reconciler")), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert policy["spec"]["egress"] == [{"ports": [{"port": 443, "protocol": "TCP"}]}]


def test_a_missing_api_key_secret_fails_with_what_to_do() -> None:
    helm = need("helm_python")
    values: dict[str, Any] = {
        "kafka": {"bootstrapServers": "kafka:9092"},
        "reconciler": {"enabled": True},
    }
    with pytest.raises(helm.HelmError, match=r"reconciler\.apiKeySecret\.name is required"):
        render(values)


def test_discovery_is_off_without_a_public_url(monkeypatch: pytest.MonkeyPatch) -> None:
    values = load_value_set("reconciler")
    del values["publicUrl"]
    (container,) = the(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "LUMA_BRIDGE_PUBLIC_URL" not in {entry["name"] for entry in container["env"]}
