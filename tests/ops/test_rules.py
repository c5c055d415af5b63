"""The alert rules: promtool accepts them, their unit tests pass, and every alert has some.

`promtool` comes with Debian's `prometheus` package. Without it these tests skip
locally and fail under CI=true.
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from typing import Any

import pytest

from tests.ops.support import (
    ALERT_TESTS_PATH,
    RULES_PATH,
    alert_rules,
    alert_signals,
    exported_metric_names,
    load_yaml,
    referenced_metrics,
    require_tool,
    rules,
)

SEVERITIES = {"warning", "critical"}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES_PATH))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(ALERT_TESTS_PATH))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_load_the_one_rules_file() -> None:
    rule_files = load_yaml(ALERT_TESTS_PATH)["rule_files"]
    assert [(ALERT_TESTS_PATH.parent / path).resolve() for path in rule_files] == [RULES_PATH]


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    firing: dict[str, int] = defaultdict(int)
    silent: dict[str, int] = defaultdict(int)
    for group in load_yaml(ALERT_TESTS_PATH)["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent)[case["alertname"]] += 1
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts, "the rules file has no alert"
    assert sorted(alerts - firing.keys()) == [], "alerts with no case where they fire"
    assert sorted(alerts - silent.keys()) == [], "alerts with no case where they stay silent"
    assert sorted((firing.keys() | silent.keys()) - alerts) == [], "tests of unknown alerts"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alert_is_labelled_and_explained(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("LumaBridge")
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    assert annotations.get("summary"), "a summary says what is wrong"
    assert annotations.get("description"), "a description says what it means and what to do"


def test_rules_use_only_series_the_bridge_exports() -> None:
    exported = exported_metric_names()
    for rule in rules():
        unknown = referenced_metrics(rule["expr"]) - exported
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {sorted(unknown)}"


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("expr", "signals"),
    [
        ('up{job=~".*b.*"} == 0', ['up{job=~".*b.*"}']),
        ('absent(up{job=~"a|b"})', ['up{job=~"a|b"}']),
        ("sum(rate(a[5m])) / sum(rate(b[5m])) > 0.05", ["sum(rate(a[5m])) / sum(rate(b[5m]))"]),
        ("x > 0\n  and\nderiv(x[10m]) > 0", ["x", "deriv(x[10m])"]),
        ("(a > bool 1) or on (job) (b <= 2)", ["a", "b"]),
        ('sum by (outcome) (c{outcome!~"a|or"}) >= 1e3', ['sum by (outcome) (c{outcome!~"a|or"})']),
        ("order_total unless orange_total", ["order_total", "orange_total"]),
    ],
)
def test_alert_signals(expr: str, signals: list[str]) -> None:
    assert alert_signals(expr) == signals
