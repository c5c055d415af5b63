"""The chart renders, lints and validates under every value set it ships (helm/.../ci/).

Every rendered manifest is checked against the Kubernetes OpenAPI schema of the oldest
and the newest Kubernetes version we support (kubernetes-validate, strict: unknown fields
fail), and custom resources against their CRD schemas in tests/deploy/schemas/.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.rendering import (
    CHART_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    SCHEMAS_DIR,
    Manifest,
    load_value_set,
    need,
    render,
    render_templates,
    value_set_names,
)

BUILTIN_GROUPS = {"", "apps", "batch", "autoscaling", "policy", "networking.k8s.io"}
EXPECTED_VALUE_SETS = {"minimal", "full", "statefulset", "existing-secret", "strimzi", "reconciler"}


def crd_schema_path(manifest: Manifest) -> str:
    """Where the schema of a custom resource lives, in kubernetes-validate's naming."""
    group, _, version = manifest["apiVersion"].rpartition("/")
    return f"{manifest['kind'].lower()}-{group.split('.')[0]}-{version}.json"


def validate_manifest(manifest: Manifest, kube_version: str) -> None:
    """Validate one manifest against Kubernetes' schema, or its CRD's schema."""
    group = manifest["apiVersion"].rpartition("/")[0]
    if group in BUILTIN_GROUPS:
        kubernetes_validate = need("kubernetes_validate")
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            raise AssertionError(
                f"{manifest['kind']}/{manifest['metadata']['name']} is invalid for "
                f"Kubernetes {kube_version} at {path}: {exc.message}"
            ) from None
        return
    jsonschema = need("jsonschema")
    schema_file = SCHEMAS_DIR / crd_schema_path(manifest)
    assert schema_file.exists(), f"no CRD schema for {manifest['apiVersion']} {manifest['kind']}"
    schema = json.loads(schema_file.read_text())
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(manifest), key=lambda e: e.path
    )
    assert not errors, "; ".join(
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors
    )


def test_every_expected_value_set_is_shipped() -> None:
    assert set(value_set_names()) >= EXPECTED_VALUE_SETS


@pytest.mark.parametrize("value_set", value_set_names())
def test_lint_is_clean(value_set: str) -> None:
    helm = need("helm_python")
    for kube_version in KUBE_VERSIONS:
        report: dict[str, Any] = helm.lint(
            str(CHART_DIR),
            load_value_set(value_set),
            strict=True,
            namespace=NAMESPACE,
            kube_version=f"v{kube_version}.0",
        )
        assert report["total_charts_linted"] == 1
        assert not report["errors"], report["errors"]
        # Severity 2 is a warning, 3 an error; "icon is recommended" (1) is fine.
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems, problems


@pytest.mark.parametrize("value_set", value_set_names())
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_validates(value_set: str, kube_version: str) -> None:
    manifests = render(load_value_set(value_set))
    assert manifests
    for manifest in manifests:
        validate_manifest(manifest, kube_version)


@pytest.mark.parametrize("value_set", value_set_names())
def test_upgrade_renders_the_same_resources(value_set: str) -> None:
    values = load_value_set(value_set)
    install = render_templates(values)
    upgrade = render_templates(values, is_upgrade=True)
    assert install.keys() == upgrade.keys()


def test_validation_catches_a_bad_manifest() -> None:
    # The validator itself must be able to fail: an unknown field and a CRD typo.
    bridge = next(m for m in render(load_value_set("full")) if m["kind"] == "StatefulSet")
    bridge["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(AssertionError, match="livenessProbes"):
        validate_manifest(bridge, KUBE_VERSIONS[-1])
    monitor = next(m for m in render(load_value_set("full")) if m["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(AssertionError, match="intervall"):
        validate_manifest(monitor, KUBE_VERSIONS[-1])


def test_all_on_renders_every_kind() -> None:
    kinds = {m["kind"] for m in render(load_value_set("full"))}
    assert kinds >= {
        "ConfigMap",
        "StatefulSet",
        "HTTPRoute",
        "HorizontalPodAutoscaler",
        "Ingress",
        "Job",
        "KafkaTopic",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Secret",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    }


def test_crds_are_off_by_default() -> None:
    kinds = {m["kind"] for m in render(load_value_set("minimal"))}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "KafkaTopic", "HTTPRoute"}


def test_every_manifest_names_its_namespace() -> None:
    for manifest in render(load_value_set("full")):
        assert re.fullmatch(r"[a-z0-9-]+", manifest["metadata"].get("namespace", "")), manifest
