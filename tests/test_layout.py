"""The layout tells the architecture: a few parts, each saying what it owns, imports one way.

The import contract lives in pyproject.toml (`[tool.importlinter]`) and runs in `make lint`;
these tests show it holds on the tree and that it fails when a lower part imports a higher one.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bridge"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def run_import_contracts(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the `bridge` package found under `root`, with the project's contracts."""
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_of_the_tree(destination: Path) -> Path:
    shutil.copytree(PACKAGE, destination / "bridge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", destination / "pyproject.toml")
    return destination


def test_top_level_has_at_most_six_modules() -> None:
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules


def test_every_part_says_what_it_owns() -> None:
    parts = [path for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()]
    assert {part.name for part in parts} >= {
        "edge",
        "contract",
        "delivery",
        "consume",
        "ops",
        "devtools",
    }
    for part in parts:
        docstring = ast.get_docstring(ast.parse((part / "__init__.py").read_text()))
        assert docstring, f"bridge/{part.name}/__init__.py has no docstring"
        assert "import" in docstring.lower(), f"bridge/{part.name} does not say what it may import"


def test_the_import_contracts_hold() -> None:
    result = run_import_contracts(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("contract/callback.py", "bridge.edge.http"),
        ("delivery/pipeline.py", "bridge.edge.http"),
        ("ops/metrics.py", "bridge.delivery.spool"),
        ("edge/http.py", "bridge.consume.tail"),
        ("consume/consumer.py", "bridge.delivery.publisher"),
    ],
)
def test_a_reversed_import_breaks_the_contract(
    tmp_path: Path, importer: str, imported: str
) -> None:
    tree = copy_of_the_tree(tmp_path)
    module = tree / "bridge" / importer
    module.write_text(module.read_text() + f"\nimport {imported}  # a deliberate reversal\n")
    result = run_import_contracts(tree)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert imported in result.stdout
