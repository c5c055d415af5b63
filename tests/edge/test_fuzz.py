"""The atheris fuzz target, run briefly: its seeds pass and a short coverage-guided run
finds nothing. `python -m tests.fuzz.fuzz_request -max_total_time=600` runs it for longer."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import IN_CI, unavailable
from tests.fuzz.fuzz_request import SEEDS, build_request

REPO = Path(__file__).resolve().parents[2]
RUNS = "2000"
SEED = 1  # libFuzzer's -seed: the same inputs on every run


def test_inputs_decode_to_requests() -> None:
    raw, authenticated, method = build_request(SEEDS[0])
    assert authenticated
    assert method == "POST"
    assert raw.startswith(b"POST /luma/callback/")
    raw, authenticated, _ = build_request(b"\x00POST\x00/x\x00\x00{}")
    assert not authenticated


def test_a_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    """Seeded, so a finding is reproducible; everything it writes stays under `tmp_path`."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n, seed in enumerate(SEEDS):
        (corpus / f"seed-{n}").write_bytes(seed)
    if importlib.util.find_spec("atheris") is not None:
        args = [
            f"-runs={RUNS}",
            f"-seed={SEED}",
            "-max_total_time=60",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ]
        ran = "Done "
    elif IN_CI:
        unavailable("atheris is not installed (pip install atheris)")
    else:
        args = ["--fallback-runs", RUNS]  # not coverage-guided, but the same target
        ran = f"fallback: {RUNS} inputs, no finding"
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_request", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    findings = sorted(path.name for path in tmp_path.iterdir() if path.name != "corpus")
    assert result.returncode == 0, (findings, result.stderr[-4000:])
    assert findings == [], result.stderr[-4000:]
    assert ran in result.stderr + result.stdout, "the fuzzer did not run"
