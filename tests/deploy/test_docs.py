"""docs/helm.md stays true: its values table is the schema's, its examples install."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy import values_table
from tests.deploy.rendering import CHART_DIR, KUBE_VERSIONS, pod_specs, render
from tests.deploy.test_chart_policy import restricted_violations
from tests.deploy.test_chart_render import validate_manifest

EXAMPLE = re.compile(r"```yaml\n# ([\w-]+-values\.yaml)\n(.*?)```", re.DOTALL)


def examples() -> dict[str, Any]:
    return {
        name: yaml.safe_load(body) for name, body in EXAMPLE.findall(values_table.DOCS.read_text())
    }


def test_values_table_is_generated_from_the_schema() -> None:
    assert values_table.current_section() == values_table.table(), (
        "docs/helm.md's values table is stale: python -m tests.deploy.values_table --write"
    )


def test_values_table_covers_every_default() -> None:
    documented = set(re.findall(r"^\| `([^`]+)` \|", values_table.table(), re.MULTILINE))
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

    def leaves(node: Any, prefix: str = "") -> set[str]:
        if isinstance(node, dict) and node and f"{prefix[:-1]}" not in documented:
            return {leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")}
        return {prefix[:-1]}

    assert leaves(defaults) <= documented


def test_docs_have_minimal_and_production_examples() -> None:
    assert {"minimal-values.yaml", "production-values.yaml"} <= set(examples())


@pytest.mark.parametrize("name", ["minimal-values.yaml", "production-values.yaml"])
def test_docs_examples_install(name: str) -> None:
    manifests = render(examples()[name])
    for manifest in manifests:
        for kube_version in KUBE_VERSIONS:
            validate_manifest(manifest, kube_version)
    for where, pod in pod_specs(manifests):
        assert restricted_violations(where, pod) == []


def test_docs_cover_the_lifecycle() -> None:
    text = values_table.DOCS.read_text()
    for command in (
        "helm install luma-bridge ./helm/luma-kafka-bridge",
        "helm upgrade luma-bridge ./helm/luma-kafka-bridge",
        "helm uninstall luma-bridge",
        "docker compose -f deploy/compose.yaml up",
    ):
        assert command in text, command
