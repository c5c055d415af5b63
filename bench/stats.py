"""Pure helpers: percentiles, medians, ratios and parsing of wrk's output. No I/O."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

WRK_MARKER = "BENCH_JSON "


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (0 < fraction <= 1); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of latencies given in seconds, in milliseconds."""
    ordered = sorted(latencies_s)
    return {
        name: round(percentile(ordered, fraction) * 1000, 3)
        for name, fraction in (
            ("p50", 0.5),
            ("p90", 0.9),
            ("p99", 0.99),
            ("p999", 0.999),
            ("max", 1.0),
        )
    }


def parse_wrk(output: str) -> dict[str, Any]:
    """The `BENCH_JSON` line the Lua script's done() prints, in friendlier units.

    Returns requests, duration_s, rps, errors (total and by kind) and latency_ms
    (p50, p90, p99, p999, max, mean). Raises ValueError when the line is missing.
    """
    for line in output.splitlines():
        if line.startswith(WRK_MARKER):
            raw = json.loads(line[len(WRK_MARKER) :])
            break
    else:
        raise ValueError("no BENCH_JSON line in wrk's output: " + output[-500:])
    duration_s = raw["duration_us"] / 1e6
    errors = dict(raw["errors"])
    return {
        "requests": raw["requests"],
        "duration_s": duration_s,
        "rps": raw["requests"] / duration_s if duration_s else 0.0,
        "errors": {"total": sum(errors.values()), **errors},
        "latency_ms": {k: v / 1000 for k, v in raw["latency_us"].items()},
    }


def median(values: Iterable[float]) -> float:
    """Median ignoring NaN; NaN when nothing is left."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    if not denominator or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def get_path(record: Mapping[str, Any], dotted: str) -> float:
    """`record["a"]["b"]` for "a.b"; NaN when absent."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return math.nan
        value = value[part]
    return float(value) if value is not None else math.nan


SUMMARY_FIELDS = (
    "rps",
    "latency_ms.p50",
    "latency_ms.p99",
    "latency_ms.p999",
    "cpu_s_per_1k",
    "peak_rss_mb",
    "errors.total",
    "loadgen_cpu_util",
)


def spread(values: Iterable[float]) -> float:
    """(max - min) / median: how far repeats of one cell disagree; NaN when fewer than 2."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if len(kept) < 2 or not statistics.median(kept):
        return math.nan
    return (max(kept) - min(kept)) / statistics.median(kept)


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median of every summary field per target and connection count.

    `runs` are records with "target", "connections" and the measured fields.
    Returns {target: {str(connections): {field: median, ..., "repeats": n,
    "cpu_spread": (max - min) / median of the CPU per callback over the repeats}}}.
    """
    grouped: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["target"], int(run["connections"])), []).append(run)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (target, connections), group in sorted(grouped.items()):
        row = {f: median(get_path(r, f) for r in group) for f in SUMMARY_FIELDS}
        row["repeats"] = len(group)
        row["cpu_spread"] = spread(get_path(r, "cpu_s_per_1k") for r in group)
        row["rps_spread"] = spread(get_path(r, "rps") for r in group)
        out.setdefault(target, {})[str(connections)] = row
    return out


#: The target that runs the bridge of `--baseline REV`.
BASELINE = "bridge:baseline"
#: What the bridge is compared with, each its own target in the same interleaved run.
YARDSTICKS = ("minimal", "floor", "floor_gc", "naive", "peer", "raw_producer", BASELINE)


def ratios(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    subject: str = "bridge",
    runs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, dict[str, float]]:
    """`subject` (the bridge, or a variant of it) against its yardsticks, per connection
    count (from medians): `rps_vs_X`, `cpu_vs_X` and `p99_vs_X` for every X in
    `YARDSTICKS` (NaN when X was not measured). With `runs`, also `cpu_vs_X_low` and
    `cpu_vs_X_high`: the lowest and highest of the per-repeat ratios (see
    `per_repeat_ratios`)."""
    out: dict[str, dict[str, float]] = {}
    for connections, row in summary.get(subject, {}).items():
        cell: dict[str, float] = {}
        for name in YARDSTICKS:
            other = summary.get(name, {}).get(connections, {})
            cell[f"rps_vs_{name}"] = ratio(row["rps"], other.get("rps", math.nan))
            cell[f"cpu_vs_{name}"] = ratio(row["cpu_s_per_1k"], other.get("cpu_s_per_1k", math.nan))
            cell[f"p99_vs_{name}"] = ratio(
                row["latency_ms.p99"], other.get("latency_ms.p99", math.nan)
            )
            paired = per_repeat_ratios(runs, subject, name, int(connections))
            cell[f"cpu_vs_{name}_low"] = min(paired, default=math.nan)
            cell[f"cpu_vs_{name}_high"] = max(paired, default=math.nan)
        out[connections] = cell
    return out


def per_repeat_ratios(
    runs: Sequence[Mapping[str, Any]], subject: str, yardstick: str, connections: int
) -> list[float]:
    """CPU per callback of `subject` over `yardstick`'s, one ratio per repeat that ran both.

    A repeat runs every target once, one after the other, so its two runs share the
    machine's state of that minute: how far these ratios are apart is how far one run's
    ratio can be trusted, which the medians alone do not show.
    """
    by_repeat: dict[int, dict[str, float]] = {}
    for run in runs:
        if int(run["connections"]) == connections and run["target"] in (subject, yardstick):
            by_repeat.setdefault(int(run["repeat"]), {})[run["target"]] = run["cpu_s_per_1k"]
    return [
        pair[subject] / pair[yardstick]
        for _, pair in sorted(by_repeat.items())
        if subject in pair and yardstick in pair and pair[yardstick] > 0
    ]


def flatness(samples: Sequence[float]) -> float:
    """(max - min) / min over the second half of `samples`: 0.1 means within 10 %."""
    half = list(samples[len(samples) // 2 :])
    if not half or min(half) <= 0:
        return math.nan
    return (max(half) - min(half)) / min(half)


def rates_for(saturation_rps: float, fractions: Sequence[float]) -> list[int]:
    """Offered rates (req/s) for the open-loop curve, as fractions of the saturation rate."""
    return sorted({max(1, round(saturation_rps * f)) for f in fractions})
