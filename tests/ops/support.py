"""Reading the dashboard and the alert rules, for the static tests and the Prometheus e2e test.

Both files live once, in the chart (`helm/luma-kafka-bridge/files/`); the compose
stack loads them from there too. These helpers turn them into the PromQL
expressions that the tests check and send to a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from bridge.ops.metrics import Metrics, ReconcilerMetrics
from tests.conftest import unavailable

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "helm" / "luma-kafka-bridge" / "files"
DASHBOARD_PATH = FILES / "grafana-dashboard.json"
RULES_PATH = FILES / "prometheus-rules.yaml"
ALERT_TESTS_PATH = Path(__file__).with_name("alerts.test.yaml")

METRIC_NAME = re.compile(r"\b(luma_bridge_[a-z0-9_]+)")


@dataclass(frozen=True)
class PanelTarget:
    """One query of one dashboard panel."""

    panel: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"panel {self.panel!r} target {self.ref_id}"


def require_tool(name: str) -> str:
    """The path of a Prometheus tool; skipped locally when missing, a failure under CI=true."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian: apt-get install -y prometheus)")
        raise AssertionError("unreachable")  # unavailable() always raises
    return path


def load_dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return document


def load_yaml(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return document


def rules() -> list[dict[str, Any]]:
    """Every rule of every group of the rules file."""
    return [rule for group in load_yaml(RULES_PATH)["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included; rows themselves excluded."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_targets(dashboard: Mapping[str, Any]) -> list[PanelTarget]:
    return [
        PanelTarget(panel["title"], target["refId"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def metric_families() -> dict[str, str]:
    """Each metric family a fresh bridge and a fresh reconciler define, by name, with its type."""
    registry = CollectorRegistry()
    Metrics(registry)
    ReconcilerMetrics(registry)
    return {family.name: family.type for family in registry.collect()}


_SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def exported_metric_names() -> set[str]:
    """The series names a fresh bridge exports (`_total` counters, histogram `_bucket`s...)."""
    return {
        f"{name}{suffix}"
        for name, kind in metric_families().items()
        for suffix in _SERIES_SUFFIXES.get(kind, ("",))
    }


def referenced_metrics(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana's `$var`, `${var}`, `${var:format}` and `[[var]]` as Grafana would.

    Raises KeyError for a variable not in `values`, so a new variable cannot slip
    through the e2e test unreplaced.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return values[name]

    return _VARIABLE.sub(replace, expr)


_OPENERS = {"(": ")", "[": "]", "{": "}"}
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")
_SET_OPERATOR = re.compile(r"(and|or|unless)\b")
_MODIFIERS = re.compile(r"(\s*(on|ignoring|group_left|group_right)\s*(\([^)]*\))?)*")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _split_top_level(expr: str) -> list[str]:
    """Split at comparison and set operators outside brackets and strings."""
    parts: list[str] = []
    closers: list[str] = []
    start = index = 0
    while index < len(expr):
        char = expr[index]
        if char in "\"'`":
            end = expr.index(char, index + 1)
            while expr[end - 1] == "\\":
                end = expr.index(char, end + 1)
            index = end + 1
            continue
        if char in _OPENERS:
            closers.append(_OPENERS[char])
        elif closers and char == closers[-1]:
            closers.pop()
        elif not closers:
            previous = expr[index - 1] if index else " "
            operator = _COMPARISON.match(expr, index)
            if operator is None and not (previous.isalnum() or previous == "_"):
                operator = _SET_OPERATOR.match(expr, index)
            if operator is not None:
                parts.append(expr[start:index])
                modifiers = _MODIFIERS.match(expr, operator.end())
                start = index = modifiers.end() if modifiers else operator.end()
                continue
        index += 1
    parts.append(expr[start:])
    return parts


def _unwrap(expr: str) -> str:
    """`(x)` → `x` when the outer parentheses enclose the whole expression."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for index, char in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0 and index < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def alert_signals(expr: str) -> list[str]:
    """The series an alert's condition compares: its operands, thresholds and `absent` removed.

    `a / b > 0.05` gives `a / b`; `x > 0 and deriv(x[10m]) > 0` gives `x` and
    `deriv(x[10m])`; `absent(up{...})` gives `up{...}`. These must return data for the
    alert to be able to fire at all: an empty condition is only "not firing" when its
    operands exist.
    """
    signals = []
    for part in _split_top_level(expr):
        part = _unwrap(part)
        if not part or _NUMBER.fullmatch(part):
            continue
        absent = re.fullmatch(r"absent(?:_over_time)?\s*\((.*)\)", part, re.DOTALL)
        if absent:
            signals.extend(alert_signals(absent.group(1)))
            continue
        inner = _split_top_level(part)
        if len(inner) > 1:  # a parenthesised condition
            signals.extend(alert_signals(part))
        else:
            signals.append(part)
    return signals
