"""Rendering the Helm chart offline and picking resources out of it, for the deploy tests.

Helm's own engine does the rendering (`helm-python-sdk` embeds Helm's Go SDK through a C
ABI), so what the tests see is what `helm install` would send, without a cluster or a
`helm` binary.
"""

from __future__ import annotations

import base64
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "luma-kafka-bridge"
VALUE_SETS_DIR = CHART_DIR / "ci"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
RELEASE = "luma-bridge"
NAMESPACE = "luma"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows; every manifest must be valid for both.
KUBE_VERSIONS = ("1.27", "1.37")

Manifest = dict[str, Any]


def need(module: str) -> ModuleType:
    """Import a test tool; skip when it is missing, except under CI where that is a failure."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise AssertionError(f"{module} is required under CI: {exc}") from exc
        pytest.skip(f"{module} is not installed: {exc}")


def load_value_set(name: str) -> dict[str, Any]:
    """One of the chart's ci/<name>-values.yaml files."""
    values = yaml.safe_load((VALUE_SETS_DIR / f"{name}-values.yaml").read_text())
    assert isinstance(values, dict)
    return values


def value_set_names() -> list[str]:
    """Every ci/*-values.yaml, by short name."""
    return sorted(p.name.removesuffix("-values.yaml") for p in VALUE_SETS_DIR.glob("*-values.yaml"))


def render_templates(values: dict[str, Any], *, is_upgrade: bool = False) -> dict[str, str]:
    """Template path -> rendered text, exactly as Helm renders it."""
    helm = need("helm_python")
    with helm.Chart.load(str(CHART_DIR)) as chart:
        rendered: dict[str, str] = chart.render(
            values=values,
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not is_upgrade,
            is_upgrade=is_upgrade,
        )
    return rendered


def render(values: dict[str, Any]) -> list[Manifest]:
    """Every manifest the chart renders with `values` (NOTES.txt left out)."""
    manifests: list[Manifest] = []
    for path, text in sorted(render_templates(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                assert isinstance(document, dict), f"{path} rendered a non-mapping document"
                manifests.append(document)
    return manifests


def notes(values: dict[str, Any]) -> str:
    """The rendered NOTES.txt."""
    return next(t for p, t in render_templates(values).items() if p.endswith("NOTES.txt"))


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    """The manifests of one kind."""
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The single manifest of `kind` (and `name`, when given)."""
    found = [m for m in of_kind(manifests, kind) if name is None or m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workload(manifests: list[Manifest]) -> Manifest:
    """The bridge's Deployment or StatefulSet (not the reconciler's Deployment)."""
    found = [
        m
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet")
        and m["metadata"]["labels"].get("app.kubernetes.io/component") == "bridge"
    ]
    assert len(found) == 1
    return found[0]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template the chart renders."""
    for manifest in manifests:
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] == "Pod":
            yield where, manifest["spec"]
        elif manifest["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            yield where, manifest["spec"]["template"]["spec"]
        elif manifest["kind"] == "CronJob":
            yield where, manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def container_env(
    manifests: list[Manifest], container: dict[str, Any], secrets: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment a container would get: envFrom ConfigMaps, then env entries.

    Secret references resolve to `secrets[key]`, else to what the chart's own Secret holds,
    else to a placeholder, so the result can be fed to the bridge's Settings.
    """
    configmaps = {m["metadata"]["name"]: m.get("data", {}) for m in of_kind(manifests, "ConfigMap")}
    rendered = {m["metadata"]["name"]: m.get("data") or {} for m in of_kind(manifests, "Secret")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom names ConfigMap {ref}, which the chart does not render"
        env.update(configmaps[ref])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            key = ref["key"]
            own = rendered.get(ref["name"], {}).get(key)
            fallback = base64.b64decode(own).decode() if own else f"placeholder-{key}-0123456789"
            env[entry["name"]] = (secrets or {}).get(key, fallback)
    return env
