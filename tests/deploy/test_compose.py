"""What can be checked of deploy/compose.yaml and its Prometheus/Grafana files without an engine."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.settings import Settings, env_name, load_settings
from tests.deploy.rendering import CHART_DIR, REPO

DEPLOY = REPO / "deploy"
PINNED = re.compile(r"^[\w./-]+:(v?\d+\.\d+\.\d+[\w.-]*)(@sha256:[a-f0-9]{64})?$")


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def host_path(mount: str) -> Path:
    return (DEPLOY / mount.split(":")[0]).resolve()


def test_the_stack_has_its_services() -> None:
    assert set(services()) >= {"kafka", "topics", "bridge", "prometheus", "grafana"}


def test_third_party_images_are_pinned() -> None:
    for name, service in services().items():
        if "build" in service:
            continue
        assert PINNED.match(service["image"]), f"{name}: {service['image']} is not pinned"


def test_bridge_images_are_built_from_the_dockerfile() -> None:
    for name in ("bridge", "topics"):
        build = services()[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        ).resolve()


def test_kafka_is_a_single_kraft_node() -> None:
    env = services()["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")
    assert "ZOOKEEPER" not in " ".join(env)
    assert services()["kafka"]["image"].startswith("apache/kafka:")


@pytest.mark.parametrize("name", ["bridge", "topics"])
def test_bridge_env_is_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = services()[name]["environment"]
    known = {env_name(field) for field in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    for key, value in env.items():
        # Compose's ${VAR:-default} interpolation, done the way compose does it.
        monkeypatch.setenv(key, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)))
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.topic_replication_factor == 1


def test_bridge_ports_volumes_and_health_match_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge = services()["bridge"]
    for key, value in bridge["environment"].items():
        monkeypatch.setenv(key, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)))
    settings = load_settings()
    published = {int(p.split(":")[-1]) for p in bridge["ports"]}
    assert published == {settings.port, settings.admin_port}
    targets = {v.split(":")[1] for v in bridge["volumes"]}
    assert str(settings.spool_dir) in targets
    assert f":{settings.admin_port}/readyz" in " ".join(bridge["healthcheck"]["test"])
    assert bridge["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services()["topics"]["command"] == ["topics", "create"]
    grace = int(bridge["stop_grace_period"].removesuffix("s"))
    assert grace > settings.shutdown_timeout > settings.drain_delay


@pytest.mark.parametrize("name", ["bridge", "topics"])
def test_bridge_runs_hardened(name: str) -> None:
    service = services()[name]
    assert service["user"] == "10001:10001"
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert "/tmp" in service["tmpfs"]  # noqa: S108 - checks /tmp is a tmpfs, uses none


def test_prometheus_loads_the_chart_rules_and_scrapes_the_admin_port() -> None:
    prometheus = services()["prometheus"]
    mounts = {v.split(":")[1]: host_path(v) for v in prometheus["volumes"]}
    rules_file = (CHART_DIR / "files" / "prometheus-rules.yaml").resolve()
    assert rules_file in mounts.values()
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    rule_target = next(k for k, v in mounts.items() if v == rules_file)
    assert any(
        Path(rule_target).match(pattern.removeprefix("/")) or rule_target == pattern
        for pattern in config["rule_files"]
    )
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "luma-kafka-bridge"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"bridge:{load_settings().admin_port}"]
    # The rules select the bridge's `up` series by this job name.
    assert "luma-kafka-bridge" in (CHART_DIR / "files" / "prometheus-rules.yaml").read_text()


def test_grafana_provisions_the_chart_dashboard() -> None:
    grafana = services()["grafana"]
    mounts = {v.split(":")[1]: host_path(v) for v in grafana["volumes"] if ":" in v}
    dashboard = (CHART_DIR / "files" / "grafana-dashboard.json").resolve()
    assert dashboard in mounts.values()
    json.loads(dashboard.read_text())
    provisioning = mounts["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "luma-kafka-bridge.yaml").read_text())
    (provider,) = providers["providers"]
    dashboard_target = next(k for k, v in mounts.items() if v == dashboard)
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_mounted_files_exist() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert host_path(volume).exists(), f"{name}: {source}"
