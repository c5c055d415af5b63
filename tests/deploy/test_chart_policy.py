"""What the rendered chart promises: restricted pods, settings that match the bridge, wiring.

The bridge's own `Settings` is built from each rendered pod's environment, so ports,
probes, paths, the spool and the grace period are checked against what the bridge will
actually read, not against a copy of its defaults.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.contract.callback import Topics
from bridge.delivery.topics import creation_configs
from bridge.settings import Settings, load_settings
from tests.deploy.rendering import (
    CHART_DIR,
    Manifest,
    container_env,
    load_value_set,
    need,
    notes,
    of_kind,
    one,
    pod_specs,
    render,
    value_set_names,
    workload,
)

RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
CUSTOM_PORTS: dict[str, Any] = {
    "kafka": {"bootstrapServers": "kafka:9092"},
    "server": {"port": 9000, "adminPort": 9100, "callbackPath": "/hooks/luma"},
    "lifecycle": {"drainDelaySeconds": 8, "shutdownTimeoutSeconds": 40, "preStopSleepSeconds": 0},
    "spool": {"mountPath": "/data/spool"},
    "ingress": {"enabled": True, "hosts": ["hooks.example.com"]},
    "httpRoute": {"enabled": True, "parentRefs": [{"name": "public"}]},
    "networkPolicy": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}},
}
VALUE_SETS = [*value_set_names(), "custom-ports"]


def values_for(name: str) -> dict[str, Any]:
    return copy.deepcopy(CUSTOM_PORTS) if name == "custom-ports" else load_value_set(name)


def restricted_violations(where: str, pod: dict[str, Any]) -> list[str]:
    """Breaches of the `restricted` Pod Security Standard (and of our own token rule)."""
    problems: list[str] = []
    pod_sc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{where}: {field}")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: service account token is mounted")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"{where}: volume {volume['name']} is {kinds}")
    containers = pod.get("initContainers", []) + pod["containers"]
    for container in containers:
        name = f"{where}/{container['name']}"
        sc = container.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: capabilities are not all dropped")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp profile is {seccomp}")
        if any("hostPort" in port for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_pod_meets_the_restricted_profile(value_set: str) -> None:
    specs = list(pod_specs(render(values_for(value_set))))
    assert specs
    for where, pod in specs:
        assert restricted_violations(where, pod) == []


def test_restricted_check_can_fail() -> None:
    where, pod = next(pod_specs(render(load_value_set("minimal"))))
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(where, pod)) == 2


def bridge_settings(
    monkeypatch: pytest.MonkeyPatch, manifests: list[Manifest], container: dict[str, Any]
) -> Settings:
    """The Settings the bridge would build from the container's rendered environment."""
    import os

    for name in list(os.environ):
        if name.startswith("LUMA_BRIDGE_"):
            monkeypatch.delenv(name)
    for name, value in container_env(manifests, container).items():
        monkeypatch.setenv(name, value)
    return load_settings()


def bridge_parts(manifests: list[Manifest]) -> list[Manifest]:
    """Leave out the reconciler's resources (tests/deploy/test_reconciler_chart.py)."""
    return [
        m
        for m in manifests
        if m["metadata"]["labels"].get("app.kubernetes.io/component") != "reconciler"
    ]


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pod_wiring_matches_the_bridge_settings(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = values_for(value_set)
    manifests = render(values)
    bridge = workload(manifests)
    pod = bridge["spec"]["template"]["spec"]
    container = one([{"kind": "c", "metadata": c, **c} for c in pod["containers"]], "c", "bridge")
    settings = bridge_settings(monkeypatch, manifests, container)

    assert port_number(container, "callback") == settings.port
    assert port_number(container, "admin") == settings.admin_port
    assert settings.host == "0.0.0.0"  # noqa: S104 - checks the pod listens on all interfaces
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert port_number(container, get["port"]) == settings.admin_port

    # The read-only root filesystem leaves the spool and /tmp as the only writable places.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts  # noqa: S108 - checks /tmp is a volume, uses none
    if settings.spool_enabled:
        assert str(settings.spool_dir) in mounts
        spool_volume = mounts[str(settings.spool_dir)]
        if bridge["kind"] == "StatefulSet":
            claims = [t["metadata"]["name"] for t in bridge["spec"]["volumeClaimTemplates"]]
            assert spool_volume in claims
        else:
            volume = next(v for v in pod["volumes"] if v["name"] == spool_volume)
            assert "emptyDir" in volume

    # SIGTERM -> drain -> exit must fit in the grace period, after the preStop sleep.
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    sleep = int(pre_stop[1]) if pre_stop else 0
    if pre_stop:
        assert pre_stop[0] == "sleep"
    assert settings.drain_delay < settings.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > sleep + settings.shutdown_timeout

    service = one(manifests, "Service", bridge["metadata"]["name"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert port_number(container, ports["callback"]["targetPort"]) == settings.port
    assert port_number(container, ports["admin"]["targetPort"]) == settings.admin_port
    pod_labels = bridge["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert bridge["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    for ingress in of_kind(manifests, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            (path,) = rule["http"]["paths"]
            assert path["path"] == settings.callback_path
            assert path["backend"]["service"]["port"]["name"] == "callback"
    for route in of_kind(manifests, "HTTPRoute"):
        (rule,) = route["spec"]["rules"]
        assert rule["matches"][0]["path"]["value"] == settings.callback_path
        assert rule["backendRefs"][0]["port"] == ports["callback"]["port"]
    for monitor in bridge_parts(of_kind(manifests, "ServiceMonitor")):
        (endpoint,) = monitor["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == ("admin", "/metrics")
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
    for policy in bridge_parts(of_kind(manifests, "NetworkPolicy")):
        ingress_ports = [r["ports"][0]["port"] for r in policy["spec"]["ingress"]]
        assert sorted(port_number(container, p) for p in ingress_ports) == sorted(
            [settings.port, settings.admin_port]
        )


@pytest.mark.parametrize("value_set", ["full", "existing-secret"])
def test_topics_job_gets_the_same_settings(value_set: str, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = render(load_value_set(value_set))
    (job,) = of_kind(manifests, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (job_container,) = job["spec"]["template"]["spec"]["containers"]
    assert job_container["args"] == ["topics", "create"]
    pod = workload(manifests)["spec"]["template"]["spec"]
    bridge_env = container_env(manifests, pod["containers"][0])
    job_env = container_env(manifests, job_container)
    # Everything but the callback credentials, which `topics create` does not need.
    callback_only = {"LUMA_BRIDGE_AUTH_TOKENS", "LUMA_BRIDGE_HMAC_SECRETS"}
    assert {k: v for k, v in bridge_env.items() if k not in callback_only} == job_env
    bridge_settings(monkeypatch, manifests, job_container)


@pytest.mark.parametrize("value_set", ["full", "strimzi"])
def test_kafka_topics_are_the_bridge_topics(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(load_value_set(value_set))
    settings = bridge_settings(
        monkeypatch, manifests, workload(manifests)["spec"]["template"]["spec"]["containers"][0]
    )
    topics = of_kind(manifests, "KafkaTopic")
    expected = Topics(settings.topic_prefix).all(lifecycle=settings.lifecycle_topic)
    assert tuple(t["spec"]["topicName"] for t in topics) == expected
    for topic in topics:
        assert topic["spec"]["partitions"] == settings.topic_partitions
        assert topic["spec"]["replicas"] == settings.topic_replication_factor
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
        assert topic["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        # The same configs `topics create` would set with the pods' settings.
        assert topic["spec"]["config"] == creation_configs(settings)


def test_dashboard_configmap_is_the_dashboard_file() -> None:
    manifests = render(load_value_set("full"))
    (dashboard,) = [
        m for m in of_kind(manifests, "ConfigMap") if "dashboard" in m["metadata"]["name"]
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    (text,) = dashboard["data"].values()
    source = (CHART_DIR / "files" / "grafana-dashboard.json").read_text()
    assert text == source.rstrip("\n")
    assert json.loads(text) == json.loads(source)


def test_prometheus_rule_is_the_rules_file() -> None:
    rule = one(render(load_value_set("full")), "PrometheusRule")
    source = yaml.safe_load((CHART_DIR / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_config_and_secret_changes_roll_the_pods() -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        result: dict[str, str] = workload(render(values))["spec"]["template"]["metadata"][
            "annotations"
        ]
        return result

    base = load_value_set("full")
    changed_config = copy.deepcopy(base)
    changed_config["settings"]["logLevel"] = "DEBUG"
    changed_secret = copy.deepcopy(base)
    changed_secret["auth"]["tokens"] = ["another-token-0123456789"]
    first, again = annotations(base), annotations(copy.deepcopy(base))
    assert first == again
    assert annotations(changed_config)["checksum/config"] != first["checksum/config"]
    assert annotations(changed_config)["checksum/secret"] == first["checksum/secret"]
    assert annotations(changed_secret)["checksum/secret"] != first["checksum/secret"]


def test_existing_secrets_are_referenced_not_created() -> None:
    manifests = render(load_value_set("existing-secret"))
    assert of_kind(manifests, "Secret") == []
    env = {
        e["name"]: e
        for e in workload(manifests)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    tokens = env["LUMA_BRIDGE_AUTH_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert tokens == {"name": "luma-bridge-tokens", "key": "tokens"}
    password = env["LUMA_BRIDGE_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "kafka-credentials", "key": "sasl-password"}


def test_chart_secret_holds_the_given_tokens() -> None:
    import base64

    manifests = render(load_value_set("full"))
    secret = one(manifests, "Secret", workload(manifests)["metadata"]["name"])
    tokens = base64.b64decode(secret["data"]["auth-tokens"]).decode()
    assert tokens.split(",") == load_value_set("full")["auth"]["tokens"]
    assert base64.b64decode(secret["data"]["kafka-sasl-password"]).decode() == "s3cret-password"


def test_a_token_is_generated_when_none_is_given() -> None:
    import base64

    manifests = render(load_value_set("minimal"))
    secret = one(manifests, "Secret")
    assert len(base64.b64decode(secret["data"]["auth-tokens"])) >= 32


def test_service_account_never_mounts_a_token() -> None:
    account = one(render(load_value_set("minimal")), "ServiceAccount")
    assert account["automountServiceAccountToken"] is False


def test_scaling_and_disruption_target_the_bridge() -> None:
    for value_set in ("minimal", "statefulset"):
        manifests = render(load_value_set(value_set))
        bridge = workload(manifests)
        pod_labels = bridge["spec"]["template"]["metadata"]["labels"]
        budget = one(manifests, "PodDisruptionBudget")
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        for hpa in of_kind(manifests, "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            assert (target["kind"], target["name"]) == (bridge["kind"], bridge["metadata"]["name"])
            assert "replicas" not in bridge["spec"]
        spread = bridge["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }


def test_statefulset_keeps_a_claim_per_pod() -> None:
    manifests = render(load_value_set("statefulset"))
    bridge = one(manifests, "StatefulSet")
    (claim,) = bridge["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert bridge["spec"]["replicas"] == 3
    headless = one(manifests, "Service", bridge["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert one(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 2


QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
# SQLite and its WAL take about 1.43 times the payload (issue 11, finding 5).
SPOOL_DISK_OVERHEAD = 1.5


def quantity_bytes(quantity: str) -> int:
    for unit, factor in QUANTITY_UNITS.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


def test_the_default_install_keeps_the_spool_on_a_claim_per_pod(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only kafka.bootstrapServers set: spooled callbacks survive pod deletion, rollouts and
    scale-down (issue 11, finding 6: the default was a Deployment with an emptyDir spool
    and an HPA that scales down when CPU is low, as it is during a Kafka outage)."""
    manifests = render(load_value_set("minimal"))
    bridge = workload(manifests)
    assert bridge["kind"] == "StatefulSet"
    pod = bridge["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = bridge_settings(monkeypatch, manifests, container)
    assert settings.spool_enabled
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = bridge["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == str(settings.spool_dir)
    # The spool is the claim, not a pod volume that dies with the pod.
    assert claim["metadata"]["name"] not in {v["name"] for v in pod["volumes"]}
    assert bridge["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    storage = quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert storage >= SPOOL_DISK_OVERHEAD * settings.spool_max_bytes
    # Nothing scales it down behind the operator's back.
    assert of_kind(manifests, "HorizontalPodAutoscaler") == []
    assert bridge["spec"]["replicas"] >= 2
    assert "WARNING" not in notes(load_value_set("minimal"))


def test_an_emptydir_spool_is_a_choice_and_says_it_can_lose_data() -> None:
    values = {"kafka": {"bootstrapServers": "kafka:9092"}, "workload": {"kind": "Deployment"}}
    bridge = workload(render(values))
    spool = next(v for v in bridge["spec"]["template"]["spec"]["volumes"] if v["name"] == "spool")
    assert "emptyDir" in spool
    assert "loses the callbacks" in notes(values)


def test_autoscaling_keeps_every_spool() -> None:
    values = {"kafka": {"bootstrapServers": "kafka:9092"}, "autoscaling": {"enabled": True}}
    manifests = render(values)
    bridge = workload(manifests)
    assert bridge["kind"] == "StatefulSet"
    assert bridge["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    assert one(manifests, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["kind"] == (
        "StatefulSet"
    )


def test_network_policy_allows_only_what_the_bridge_needs() -> None:
    values = load_value_set("full")
    policy = one(render(values), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    callback, admin = spec["ingress"]
    assert callback["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    assert admin["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    dns, kafka = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert [p["port"] for p in kafka["ports"]] == [9093]
    assert kafka["to"] == values["networkPolicy"]["kafka"]["to"]


def test_notes_print_the_callback_url() -> None:
    text = notes(load_value_set("full"))
    assert "https://luma-bridge.example.com/luma/callback/<token>" in text
    minimal = notes(load_value_set("minimal"))
    assert "http://luma-bridge-luma-kafka-bridge.luma.svc:8080/luma/callback/<token>" in minimal
    route = notes(
        {
            **CUSTOM_PORTS,
            "ingress": {"enabled": False},
            "httpRoute": {
                "enabled": True,
                "parentRefs": [{"name": "gw"}],
                "hostnames": ["hooks.example.com"],
            },
        }
    )
    assert "https://hooks.example.com/hooks/luma/<token>" in route


BAD_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("unknown top-level key", {"replicas": 3}),
    ("port out of range", {"server": {"port": 70000}}),
    ("callback path without slash", {"server": {"callbackPath": "luma/callback"}}),
    ("callback path with trailing slash", {"server": {"callbackPath": "/luma/"}}),
    ("bad security protocol", {"kafka": {"securityProtocol": "TLS"}}),
    ("bad SASL mechanism", {"kafka": {"sasl": {"mechanism": "GSSAPI"}}}),
    ("bootstrap without port", {"kafka": {"bootstrapServers": "kafka"}}),
    ("bad workload kind", {"workload": {"kind": "DaemonSet"}}),
    ("short token", {"auth": {"tokens": ["abc"]}}),
    ("token with a slash", {"auth": {"tokens": ["0123456789abcdef/0123"]}}),
    ("bad topic prefix", {"topics": {"prefix": "luma generation"}}),
    ("zero partitions", {"topics": {"partitions": 0}}),
    ("negative drain", {"lifecycle": {"drainDelaySeconds": -1}}),
    ("bad image digest", {"image": {"digest": "latest"}}),
    ("privilege escalation", {"securityContext": {"allowPrivilegeEscalation": True}}),
    ("root allowed", {"podSecurityContext": {"runAsNonRoot": False}}),
    ("unknown setting", {"settings": {"logLevl": "INFO"}}),
    ("bad setting value", {"settings": {"logLevel": "TRACE"}}),
    ("setting with a dedicated value", {"settings": {"spoolDir": "/x"}}),
    ("ack timeout above Luma's", {"settings": {"kafkaAckTimeout": 5}}),
    ("bad quantity", {"spool": {"sizeLimit": "lots"}}),
    ("bad scrape interval", {"metrics": {"serviceMonitor": {"interval": "soon"}}}),
    ("bad strimzi api", {"topics": {"strimzi": {"apiVersion": "kafka.strimzi.io/v1alpha1"}}}),
]


@pytest.mark.parametrize(("case", "overlay"), BAD_VALUES, ids=[c for c, _ in BAD_VALUES])
def test_schema_rejects_bad_values(case: str, overlay: dict[str, Any]) -> None:
    helm = need("helm_python")
    values = {"kafka": {"bootstrapServers": "kafka:9092"}}
    with helm.Chart.load(str(CHART_DIR)) as chart:
        merged = chart.merge_values(_merge(values, overlay))
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(merged)
    with pytest.raises(helm.HelmValuesError):
        render(_merge(values, overlay))


@pytest.mark.parametrize("value_set", value_set_names())
def test_schema_accepts_the_shipped_value_sets(value_set: str) -> None:
    helm = need("helm_python")
    with helm.Chart.load(str(CHART_DIR)) as chart:
        chart.validate_schema(chart.merge_values(load_value_set(value_set)))


BAD_COMBINATIONS: list[tuple[str, dict[str, Any]]] = [
    ("kafka.bootstrapServers is required", {}),
    (
        "drainDelaySeconds must be below",
        {"lifecycle": {"drainDelaySeconds": 30, "shutdownTimeoutSeconds": 25}},
    ),
    ("server.port and server.adminPort must differ", {"server": {"adminPort": 8080}}),
    (
        "kafka.sasl.mechanism is required",
        {"kafka": {"securityProtocol": "SASL_SSL"}},
    ),
    (
        "kafka.sasl.password or kafka.sasl.existingSecret is required",
        {
            "kafka": {
                "securityProtocol": "SASL_SSL",
                "sasl": {"mechanism": "PLAIN", "username": "u"},
            }
        },
    ),
    ("topics.strimzi.clusterName is required", {"topics": {"strimzi": {"enabled": True}}}),
    (
        "autoscaling a Deployment deletes a scaled-away pod's spool",
        {"workload": {"kind": "Deployment"}, "autoscaling": {"enabled": True}},
    ),
    (
        "autoscaling with spool.persistence.retentionPolicy.whenScaled=Delete",
        {
            "autoscaling": {"enabled": True},
            "spool": {"persistence": {"retentionPolicy": {"whenScaled": "Delete"}}},
        },
    ),
    (
        "topics.minInsyncReplicas must not exceed topics.replicationFactor",
        {"topics": {"replicationFactor": 2, "minInsyncReplicas": 3}},
    ),
    (
        "set only one of minAvailable and maxUnavailable",
        {"podDisruptionBudget": {"minAvailable": 1}},
    ),
]


@pytest.mark.parametrize(
    ("message", "overlay"), BAD_COMBINATIONS, ids=[m for m, _ in BAD_COMBINATIONS]
)
def test_templates_reject_bad_combinations(message: str, overlay: dict[str, Any]) -> None:
    helm = need("helm_python")
    values = (
        {}
        if message.startswith("kafka.bootstrapServers")
        else {"kafka": {"bootstrapServers": "kafka:9092"}}
    )
    with pytest.raises(helm.HelmError, match=message.replace(".", r"\.")):
        render(_merge(values, overlay))


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Settings the chart sets through dedicated values, never through `settings:`.
CHART_MANAGED_SETTINGS = {
    "host", "port", "admin_port", "callback_path", "auth_tokens", "kafka_bootstrap_servers",
    "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username",
    "kafka_sasl_password", "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile",
    "topic_prefix", "topic_partitions", "topic_replication_factor", "topic_configs",
    "topic_min_insync_replicas",
    "spool_enabled", "spool_dir", "drain_delay", "shutdown_timeout",
    # Secrets and secret files: from the chart's (or an existing) Secret, never the ConfigMap.
    "auth_tokens_file", "hmac_secrets", "tls_cert_file", "tls_key_file",
    # The reconciler's own values (reconciler.apiKeySecret, .lumaBaseUrl, .publicUrl).
    "luma_api_key", "luma_base_url", "public_url",
    # One worker per pod, the default: the chart scales with replicas, not `--workers`.
    "workers",
}  # fmt: skip


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def test_settings_schema_follows_the_bridge_settings() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    chart_settings = schema["properties"]["settings"]["properties"]
    bridge_schema = Settings.model_json_schema()["properties"]
    for key, spec in chart_settings.items():
        field = _snake(key)
        assert field in bridge_schema, f"settings.{key}: the bridge has no setting {field}"
        assert field not in CHART_MANAGED_SETTINGS
        theirs = bridge_schema[field]
        for constraint in ("type", "enum", "minimum", "maximum", "exclusiveMinimum",
                           "exclusiveMaximum"):  # fmt: skip
            assert spec.get(constraint) == theirs.get(constraint), f"settings.{key} {constraint}"
    missing = set(bridge_schema) - CHART_MANAGED_SETTINGS - {_snake(k) for k in chart_settings}
    assert not missing, (
        f"bridge settings {sorted(missing)} have no chart value: add them to values.schema.json "
        "`settings` (and docs/helm.md via tests/deploy/values_table.py)"
    )
    assert set(bridge_schema) >= CHART_MANAGED_SETTINGS


def test_the_chart_ships_its_own_copy_of_nothing() -> None:
    # One dashboard and one rules file: the chart's files/ (compose mounts them from there).
    names = {p.name for p in Path(CHART_DIR).rglob("*") if p.is_file()}
    assert sorted(n for n in names if n.endswith(".json") and "dashboard" in n) == [
        "grafana-dashboard.json"
    ]


def test_the_service_monitor_selects_exactly_one_service() -> None:
    """In StatefulSet mode the headless Service must not be scraped too (double series)."""
    values = load_value_set("statefulset")
    values.setdefault("metrics", {}).setdefault("serviceMonitor", {})["enabled"] = True
    manifests = render(values)
    wanted = one(manifests, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    services = [
        service
        for service in of_kind(manifests, "Service")
        if wanted.items() <= service["metadata"]["labels"].items()
    ]
    assert len(of_kind(manifests, "Service")) == 2
    assert len(services) == 1
