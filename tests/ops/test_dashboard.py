"""The Grafana dashboard: loadable by the sidecar as-is, and covering every metric.

Whether each panel really shows data is for the e2e test against a real
Prometheus (tests/integration/test_prometheus_e2e.py); these checks are static.
"""

from __future__ import annotations

import re
from itertools import combinations
from typing import Any

import pytest

from tests.ops.support import (
    exported_metric_names,
    load_dashboard,
    metric_families,
    panel_targets,
    panels,
    referenced_metrics,
    substitute,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = re.compile(r"\b(luma_bridge_[a-z0-9_]+|up)\b(\{[^}]*\})?")
FILTERS = ('job=~"$job"', 'instance=~"$instance"')


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def test_loads_as_is_without_import_inputs(dashboard: dict[str, Any]) -> None:
    # The Grafana sidecar and file provisioning do not resolve `__inputs`.
    assert "__inputs" not in dashboard
    assert "${DS_" not in str(dashboard)
    assert dashboard["uid"] == "luma-kafka-bridge"
    assert dashboard["schemaVersion"] >= 36


def test_datasource_is_a_variable(dashboard: dict[str, Any]) -> None:
    datasource = variables(dashboard)["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for name in ("job", "instance"):
        variable = variables(dashboard)[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["includeAll"]
        assert variable["allValue"] == ".*"


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panels_are_described_and_unique(dashboard: dict[str, Any]) -> None:
    every = list(panels(dashboard)) + [p for p in dashboard["panels"] if p["type"] == "row"]
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in panels(dashboard)]
    assert len(titles) == len(set(titles))
    for panel in panels(dashboard):
        assert panel.get("description"), f"{panel['title']} says nothing about what it shows"


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    boxes = []
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((panel["title"], grid))
    for (title_a, a), (title_b, b) in combinations(boxes, 2):
        apart = (
            a["x"] + a["w"] <= b["x"]
            or b["x"] + b["w"] <= a["x"]
            or a["y"] + a["h"] <= b["y"]
            or b["y"] + b["h"] <= a["y"]
        )
        assert apart, f"{title_a!r} overlaps {title_b!r}"


def test_every_metric_has_a_panel(dashboard: dict[str, Any]) -> None:
    shown: set[str] = set()
    for target in panel_targets(dashboard):
        shown |= referenced_metrics(target.expr)
    for name, kind in metric_families().items():
        if kind == "histogram":
            assert f"{name}_bucket" in shown, f"no quantile panel for {name}"
        elif kind == "counter":
            assert f"{name}_total" in shown, f"no panel for {name}_total"
        else:
            assert name in shown, f"no panel for {name}"
    assert shown <= exported_metric_names(), "panels query series the bridge does not export"


def test_every_histogram_has_p50_p95_p99(dashboard: dict[str, Any]) -> None:
    exprs = [target.expr for target in panel_targets(dashboard)]
    for name, kind in metric_families().items():
        if kind != "histogram":
            continue
        for quantile in ("0.5", "0.95", "0.99"):
            pattern = rf"histogram_quantile\({quantile}, sum by \(le\) \(rate\({name}_bucket"
            assert any(re.match(pattern, expr) for expr in exprs), f"{name} p{quantile}"


def test_callback_rates_by_state_and_by_outcome(dashboard: dict[str, Any]) -> None:
    exprs = [target.expr for target in panel_targets(dashboard)]
    for label in ("state", "outcome"):
        prefix = f"sum by ({label}) (rate(luma_bridge_callbacks_total{{"
        assert any(expr.startswith(prefix) for expr in exprs), f"callbacks/s by {label}"


def test_rates_use_the_rate_interval(dashboard: dict[str, Any]) -> None:
    for target in panel_targets(dashboard):
        ranges = re.findall(r"\[([^\]]*)\]", target.expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{target}: {ranges}"


def test_every_series_is_filtered_by_job_and_instance(dashboard: dict[str, Any]) -> None:
    for target in panel_targets(dashboard):
        for match in SELECTOR.finditer(target.expr):
            matchers = match.group(2) or ""
            assert all(f in matchers for f in FILTERS), f"{target}: {match.group(0)}"


def test_every_variable_used_is_defined(dashboard: dict[str, Any]) -> None:
    builtin = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
    defined = {name: ".*" for name in variables(dashboard)}
    for target in panel_targets(dashboard):
        expr = substitute(target.expr, {**builtin, **defined})
        assert "$" not in expr, target


def test_substitute_knows_grafana_syntaxes() -> None:
    values = {"job": "bridge", "__rate_interval": "1m"}
    assert substitute('x{job=~"$job"}[$__rate_interval]', values) == 'x{job=~"bridge"}[1m]'
    assert substitute("${job} ${job:regex} [[job]]", values) == "bridge bridge bridge"
    with pytest.raises(KeyError):
        substitute("$instance", values)
