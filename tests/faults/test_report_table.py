"""`scripts/faults-table`: the README's fault table is written from a `make faults` report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.harness import OUTAGE, checkout, write_report_line
from tests.helpers import git

SCRIPT = Path(__file__).parents[2] / "scripts" / "faults-table"

README = """# Title

Before.

<!-- fault-report -->
| an old table |
<!-- /fault-report -->

After.
"""


def audit(scenario: str, **numbers: object) -> str:
    counts = {
        "sent": 10,
        "acknowledged": 10,
        "missing": 0,
        "duplicates": 0,
        "order_violations": 0,
        "regressions": 0,
        "regressions_by_bridge": 0,
        "statuses": {"200": 10},
        "outage_s": 30.0,  # as the harness writes FAULT_OUTAGE_SECONDS
    }
    return json.dumps({"scenario": scenario, **counts, **numbers}) + "\n"


def run(tmp_path: Path, report: str) -> tuple[subprocess.CompletedProcess[str], str]:
    (tmp_path / "report.jsonl").write_text(report)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "report.jsonl"), str(readme)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": ""},
    )
    return done, readme.read_text()


def test_each_scenario_becomes_one_row_between_the_markers(tmp_path: Path) -> None:
    report = (
        audit("broker frozen mid-load")
        + audit(
            "SIGTERM mid-load",
            acknowledged=4,
            statuses={"200": 4, "connection error": 7},
            duplicates=2,
            regressions=1,
        )
        + audit("spool full", statuses={"200": 10, "503": 3, "connection error": 1})
        + audit("Kafka: whole cluster stopped and started", missing=5)
        + audit(
            "Kafka: whole cluster stopped and started (full audit)",
            order_violations=1,
            kafka="4.4.0",
        )
    )
    done, text = run(tmp_path, report)
    assert done.returncode == 0, done.stderr
    assert text.startswith("# Title\n\nBefore.\n\n<!-- fault-report -->\nNumbers from the last")
    assert text.endswith("<!-- /fault-report -->\n\nAfter.\n")
    assert "commit unknown, 30 s outages" in text  # no git on PATH
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [
        "| broker frozen mid-load | 10 | 10 | 0 | **0** | **0** | 0 | 0 (0) |",
        "| SIGTERM mid-load | 10 | 4 | 7 (connection error) | **0** | **0** | 2 | 1 (0) |",
        "| spool full | 10 | 10 | 4 (503: 3, connection error: 1) | **0** | **0** | 0 | 0 (0) |",
        "| Apache Kafka 4.4.0, 3 brokers, idempotent producer: whole cluster stopped and "
        "started | 10 | 10 | 0 | **0** | **1** | 0 | n/a |",
    ]
    assert "an old table" not in text


def test_an_empty_report_leaves_the_readme_as_it_was(tmp_path: Path) -> None:
    done, text = run(tmp_path, "")
    assert done.returncode == 1
    assert "run `make faults` first" in done.stderr
    assert text == README


def test_the_table_names_the_commits_the_lines_record(tmp_path: Path) -> None:
    report = (
        audit("broker frozen mid-load", commit="b7fff22")
        + audit("SIGTERM mid-load", commit="b7fff22-dirty")
        + audit("spool full", commit="b7fff22")
    )
    done, text = run(tmp_path, report)
    assert done.returncode == 0, done.stderr
    assert "commit b7fff22 and b7fff22-dirty, 30 s outages" in text


def test_a_line_without_its_commit_adds_the_readmes_checkout(tmp_path: Path) -> None:
    report = audit("broker frozen mid-load", commit="b7fff22") + audit("spool full")
    done, text = run(tmp_path, report)
    assert done.returncode == 0, done.stderr
    assert "commit b7fff22 and unknown, 30 s outages" in text  # no git on PATH


def test_the_harness_records_the_commit_and_outage_with_each_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "report.jsonl"
    monkeypatch.setenv("FAULT_REPORT", str(report))
    write_report_line({"scenario": "a scenario", "sent": 1})
    [line] = report.read_text().splitlines()
    assert json.loads(line) == {
        "scenario": "a scenario",
        "sent": 1,
        "outage_s": OUTAGE,
        "commit": checkout(),
    }


def test_the_commit_is_the_checkouts_and_says_when_the_code_differs(tmp_path: Path) -> None:
    assert checkout(tmp_path) == "unknown"  # not a git checkout
    git(tmp_path, "init", "-q")
    for name in ("bridge/code.py", "tests/test_code.py", "README.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("one\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "one")
    git(tmp_path, "tag", "v1")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert checkout(tmp_path) == head  # the commit, not the tag
    assert checkout(tmp_path / "tests") == head  # from anywhere in the checkout
    (tmp_path / "README.md").write_text("two\n")
    (tmp_path / "untracked.py").write_text("new\n")
    assert checkout(tmp_path) == head  # neither runs in a scenario
    (tmp_path / "tests" / "test_code.py").write_text("two\n")
    assert checkout(tmp_path) == f"{head}-dirty"
    git(tmp_path, "checkout", "--", "tests")
    (tmp_path / "bridge" / "code.py").write_text("two\n")
    assert checkout(tmp_path) == f"{head}-dirty"
