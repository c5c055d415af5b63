"""The atheris fuzz target, run briefly: its seeds pass and a short coverage-guided run
finds nothing. `python -m tests.fuzz.fuzz_request -max_total_time=600` runs it for longer."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tests.conftest import IN_CI, unavailable
from tests.fuzz.fuzz_request import SEEDS, build_request

REPO = Path(__file__).resolve().parents[2]
RUNS = "2000"


def test_inputs_decode_to_requests() -> None:
    raw, authenticated, method = build_request(SEEDS[0])
    assert authenticated
    assert method == "POST"
    assert raw.startswith(b"POST /luma/callback/")
    raw, authenticated, _ = build_request(b"\x00POST\x00/x\x00\x00{}")
    assert not authenticated


def test_a_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    for n, seed in enumerate(SEEDS):
        (tmp_path / f"seed-{n}").write_bytes(seed)
    if importlib.util.find_spec("atheris") is not None:
        args = [f"-runs={RUNS}", "-max_total_time=60", str(tmp_path)]
    elif IN_CI:
        unavailable("atheris is not installed (pip install atheris)")
    else:
        args = ["--fallback-runs", RUNS]  # not coverage-guided, but the same target
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_request", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
