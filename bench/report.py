"""Turning results into the target check, a Markdown table, a PNG plot and a profile summary."""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import BASELINE, flatness

TARGET_CONNECTIONS = "64"
#: Issue 14's limit on the bridge's CPU per callback, as a multiple of the floor's.
CPU_LIMIT_VS_FLOOR = 1.5
#: The two targets `write_profile_gap` compares, the bridge first.
GAP_TARGETS = ("bridge", "floor")
LABELS = {
    "minimal": "minimal aiohttp (HTTP limit)",
    "floor": "floor: aiohttp + the two records",
    "floor_gc": "floor, its garbage collector tuned as the bridge's",
    "naive": "naive peer: aiohttp + 2 send_and_wait",
    "raw_producer": "raw aiokafka producer (Kafka limit)",
    "peer": "FastAPI + send_and_wait peer",
    "bridge": "luma-kafka-bridge (defaults)",
    BASELINE: "the bridge at `--baseline` (same settings)",
}


def target_label(target: str) -> str:
    """The table's name for a target; a bridge variant is `bridge:NAME` with its flags."""
    return LABELS.get(target, target)


def sanitize(value: Any) -> Any:
    """NaN becomes None, recursively, so the JSON file is standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value


def cpu_ratio(row: Mapping[str, float], name: str) -> str:
    """The median CPU ratio against `name`, with the range of the per-repeat ratios."""
    spread = cpu_range(row, name)
    return _fmt(row[f"cpu_vs_{name}"], 2) + (f" ({spread})" if spread else "")


def cpu_range(row: Mapping[str, float], name: str) -> str:
    """`low to high` of the per-repeat CPU ratios against `name`; empty when not measured."""
    low = row.get(f"cpu_vs_{name}_low", math.nan)
    high = row.get(f"cpu_vs_{name}_high", math.nan)
    return "" if math.isnan(low) or math.isnan(high) else f"{_fmt(low, 2)} to {_fmt(high, 2)}"


def _check(name: str, value: float, limit: float, *, at_most: bool) -> dict[str, Any]:
    if math.isnan(limit):
        value = math.nan
    met = (value <= limit) if at_most else (value >= limit)
    return {
        "target": name,
        "value": None if math.isnan(value) else round(value, 3),
        "limit": ("<= " if at_most else ">= ") + str(limit),
        "met": None if math.isnan(value) else met,
    }


def _open_loop_p99(results: Mapping[str, Any], target: str, fraction: float) -> float:
    points = [
        p
        for p in results.get("open_loop", [])
        if p.get("target", "bridge") == target
        and abs(p.get("fraction_of_saturation", 0) - fraction) < 0.01
    ]
    return float(points[0]["latency_ms"]["p99"]) if points else math.nan


def check_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets (and issue 15's tracing-off cost), from this run's medians."""
    ratios = results.get("ratios", {}).get(TARGET_CONNECTIONS, {})
    bridge = results.get("summary", {}).get("bridge", {}).get(TARGET_CONNECTIONS, {})
    checks = [
        _check(
            "CPU per callback vs floor (64 conn)"
            + (f", per repeat {spread}" if (spread := cpu_range(ratios, "floor")) else ""),
            ratios.get("cpu_vs_floor", math.nan),
            CPU_LIMIT_VS_FLOOR,
            at_most=True,
        ),
        _check(
            "throughput vs naive peer (64 conn)",
            ratios.get("rps_vs_naive", math.nan),
            0.8,
            at_most=False,
        ),
        _check("p99 ms at 64 conn", bridge.get("latency_ms.p99", math.nan), 25, at_most=True),
        _check(
            "p99 ms at half the saturation rate (open loop)",
            _open_loop_p99(results, "bridge", 0.5),
            25,
            at_most=True,
        ),
        _check(
            "p99 ms at 0.7 x the saturation rate (open loop)",
            _open_loop_p99(results, "bridge", 0.7),
            50,
            at_most=True,
        ),
    ]
    tracing = results.get("tracing_off")
    if tracing and bridge:
        # The cost as a share of the bridge's CPU per callback, against how much the
        # bridge's own repeats disagree: "within noise" means below that spread.
        share = tracing["cost_us_per_callback"] / (bridge["cpu_s_per_1k"] * 1000)
        noise = bridge.get("cpu_spread", math.nan)
        checks.append(
            _check(
                "tracing-off path, share of CPU per callback (64 conn) "
                f"vs run-to-run spread {_fmt(noise * 100, 1)} %",
                share,
                round(noise, 3) if not math.isnan(noise) else math.nan,
                at_most=True,
            )
        )
    soak = results.get("soak")
    if soak:
        checks.append(
            _check(
                f"RSS spread over 2nd half of {soak['callbacks']:,} callbacks",
                soak["rss_second_half_spread"],
                0.10,
                at_most=True,
            )
        )
    return checks


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
    """The README table: medians per target and connection count, ratios, targets, machine."""
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"Measured {results['started_at']} on {m['cpu']} ({m['cores']} cores, "
        f"{m['memory_gib']} GiB), Linux {m['kernel']}, Python {m['python']}, {m['wrk']}, "
        f"broker {m['broker']}. Pinning: {results['layout']}. "
        f"Medians of {s['repeats']} interleaved runs of {s['duration_s']:.0f} s; "
        f"bodies {min(s['body_bytes'])}-{max(s['body_bytes'])} bytes. Load average "
        f"(1, 5, 15 min) at the start {m.get('loadavg_at_start', '-')}, at the end "
        f"{results.get('loadavg_at_end', '-')}.",
        "",
        "| target | conns | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 1k | CPU spread "
        "| peak RSS MB | errors | wrk CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = results.get("summary", {})
    for target in [*LABELS, *sorted(t for t in summary if t not in LABELS)]:
        for connections, row in summary.get(target, {}).items():
            lines.append(
                f"| {target_label(target)} | {connections} | {_fmt(row['rps'], 0)} "
                f"| {_fmt(row['latency_ms.p50'], 2)} | {_fmt(row['latency_ms.p99'], 2)} "
                f"| {_fmt(row['latency_ms.p999'], 2)} | {_fmt(row['cpu_s_per_1k'], 3)} "
                f"| {_fmt(row.get('cpu_spread', math.nan) * 100, 0)} % "
                f"| {_fmt(row['peak_rss_mb'], 0)} | {_fmt(row['errors.total'], 0)} "
                f"| {_fmt(row['loadgen_cpu_util'] * 100, 0)} % |"
            )
    lines += [
        "",
        "CPU spread: (max - min) / median of the CPU per callback over the repeats of a cell.",
        "",
        "Ratios are of medians; in brackets, the lowest and highest of the per-repeat CPU "
        "ratios (each repeat runs every target once, back to back): how far one run's "
        "ratio can be trusted.",
        "",
        "| bridge vs | conns | req/s ratio | CPU/callback ratio | p99 ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for connections, row in results.get("ratios", {}).items():
        for name in ("floor", "floor_gc", "naive", "minimal", "peer", BASELINE):
            if math.isnan(row.get(f"rps_vs_{name}", math.nan)):
                continue
            lines.append(
                f"| {target_label(name)} | {connections} | {_fmt(row[f'rps_vs_{name}'], 2)} "
                f"| {cpu_ratio(row, name)} | {_fmt(row[f'p99_vs_{name}'], 2)} |"
            )
    for target, by_connections in results.get("variant_ratios", {}).items():
        for connections, row in by_connections.items():
            if math.isnan(row.get("rps_vs_floor", math.nan)):
                continue  # the floor was not measured in this run
            lines.append(
                f"| {target_label('floor')} (for {target}) | {connections} "
                f"| {_fmt(row['rps_vs_floor'], 2)} | {cpu_ratio(row, 'floor')} "
                f"| {_fmt(row['p99_vs_floor'], 2)} |"
            )
    tracing = results.get("tracing_off")
    if tracing:
        lines += [
            "",
            f"Tracing off (the default): the tracing hooks cost "
            f"{tracing['cost_us_per_callback']:.2f} µs per callback "
            f"({tracing['with_tracing_off_us']:.2f} µs with them, "
            f"{tracing['without_us']:.2f} µs without; `bench/tracingcost.py`, server core).",
        ]
    if results.get("open_loop"):
        lines += [
            "",
            f"Open loop (same offered rates for each target; saturation "
            f"{results['saturation_rps']:,.0f} req/s = the bridge's best closed-loop median):",
            "",
            "| target | offered req/s | x saturation | answered/s | p50 ms | p99 ms | p99.9 ms "
            "| non-200 | unanswered | server CPU | CPU s / 1k | generator + broker CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in results["open_loop"]:
            lat = p["latency_ms"]
            target = p.get("target", "bridge")
            core_1 = p.get("loadgen_cpu_util", math.nan) + p.get("broker_cpu_util", math.nan)
            lines.append(
                f"| {target} | {p['offered_rps']:,.0f} | {p['fraction_of_saturation']:.2f} "
                f"| {p['achieved_rps']:,.0f} | {_fmt(lat['p50'], 2)} | {_fmt(lat['p99'], 2)} "
                f"| {_fmt(lat['p999'], 2)} | {p['answered'] - p['ok']} "
                f"| {p['unanswered_within_5s']} | {p['server_cpu_util'] * 100:.0f} % "
                f"| {_fmt(p.get('cpu_s_per_1k', math.nan), 3)} "
                f"| {_fmt(core_1 * 100, 0)} % |"
            )
    if results.get("batching"):
        lines += [
            "",
            "Batching (raw producer, no HTTP, open loop at the same rates; aiokafka keeps one "
            "produce request in flight per broker):",
            "",
            "| callbacks/s | linger ms | produce requests per callback | CPU s / 1k | p50 ms "
            "| p99 ms |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for point in results["batching"]:
            lat = point["latency_ms"]
            lines.append(
                f"| {point['rate']:,.0f} | {point['linger_ms']} "
                f"| {point['produce_requests_per_callback']:.2f} "
                f"| {_fmt(point['cpu_s_per_1k'], 3)} | {_fmt(lat['p50'], 2)} "
                f"| {_fmt(lat['p99'], 2)} |"
            )
    soak = results.get("soak")
    if soak:
        rss = [p["rss_mb"] for p in soak["points"]]
        lines += [
            "",
            f"Soak: {soak['callbacks']:,} callbacks in {soak['seconds']:.0f} s; RSS "
            f"{rss[0]:.0f} → {rss[-1]:.0f} MB, spread over the second half "
            f"{flatness(rss) * 100:.1f} %.",
        ]
    lines += ["", "| target (issue 14) | measured | limit | met |", "|---|---:|---:|---|"]
    for check in results.get("targets_check", []):
        met = {True: "yes", False: "**no**", None: "-"}[check["met"]]
        value = _fmt(check["value"], 2)
        lines.append(f"| {check['target']} | {value} | {check['limit']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Four panels: req/s, p99 and CPU per callback by connections; the bridge's open-loop curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    summary = results.get("summary", {})
    for target, rows in summary.items():
        conns = [int(c) for c in rows]
        name = target_label(target)
        axes[0][0].plot(conns, [r["rps"] for r in rows.values()], marker="o", label=name)
        axes[0][1].plot(conns, [r["latency_ms.p99"] for r in rows.values()], marker="o", label=name)
        axes[1][0].plot(conns, [r["cpu_s_per_1k"] for r in rows.values()], marker="o", label=name)
    for ax, title, ylabel in (
        (axes[0][0], "throughput (closed loop, wrk)", "requests/s"),
        (axes[0][1], "p99 answer time", "ms (log)"),
        (axes[1][0], "server CPU per 1,000 callbacks", "CPU seconds"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0][1].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    ax = axes[1][1]
    points = results.get("open_loop", [])
    if points:
        for target, style in (("bridge", "-"), ("floor", ":")):
            mine = [p for p in points if p.get("target", "bridge") == target]
            if not mine:
                continue
            offered = [p["offered_rps"] for p in mine]
            for key, label in (("p50", "p50"), ("p99", "p99")):
                ax.plot(
                    offered,
                    [p["latency_ms"][key] for p in mine],
                    linestyle=style,
                    marker="o",
                    label=f"{target} {label}",
                )
        ax.axvline(results["saturation_rps"], color="grey", linestyle="--", label="saturation")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("bridge and floor: answer time vs offered load (open loop)")
    ax.set_xlabel("offered requests/s")
    ax.set_ylabel("ms (log)")
    ax.grid(True, alpha=0.3)
    m = results["machine"]
    fig.suptitle(
        f"luma-kafka-bridge benchmark, {results['started_at']}: {m['cpu']}, {m['cores']} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: The event loop's category (its Python and, under `LOOP_RUNNERS`, its C code).
LOOP = "asyncio / uvloop"
# py-spy raw frames look like "handle (bridge/edge/http.py:81)".
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")
# A sample's cost goes to the category of its innermost frame (so the shares add up
# to 100 %); stdlib helpers called by a category (json, datetime, hashlib) count for
# the first category found walking outwards.
CATEGORIES = (
    ("logging (bridge.ops.logs + stdlib logging)", ("bridge/ops/logs.py", "logging/")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("pydantic validation", ("pydantic",)),
    ("aiokafka (producer, client, conn)", ("aiokafka/",)),
    ("aiohttp (web protocol, request, response)", ("aiohttp/", "multidict/", "yarl/")),
    ("bridge code (own frames)", ("bridge/",)),
    (LOOP, ("asyncio/", "uvloop/")),
)
#: Innermost frames of a sleeping thread (the log writer between batches): not CPU.
IDLE_FUNCTIONS = {"wait", "Condition.wait"}
#: Innermost Python frames under which only the event loop's own C code runs (uvloop's
#: polling, transports and timers): the loop's time, whichever package started it. The
#: bridge starts its loop with `asyncio.Runner`, the floor with aiohttp's `run_app`.
LOOP_RUNNERS = {
    ("run_app", "aiohttp/web.py"),
    ("Runner.run", "asyncio/runners.py"),
    ("run", "uvloop/__init__.py"),
}
LOOP_SELF = "the event loop's own C code (uvloop)"
OTHER = "other (stdlib helpers: json, datetime, hashlib, enum, ...)"


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) from one py-spy frame; the file shortened to package/module."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    path = match.group("file")
    parts = path.split("/")
    for anchor in ("site-packages", "lib", "main"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    return match.group("func"), "/".join(parts[-3:])


def categorize(frames: list[tuple[str, str]]) -> str:
    """The category of the innermost frame that belongs to one, else OTHER."""
    if frames and frames[-1] in LOOP_RUNNERS:
        return LOOP
    for _, file in reversed(frames):
        for label, needles in CATEGORIES:
            if any(needle in file for needle in needles):
                return label
    return OTHER


@dataclass
class Samples:
    """py-spy's samples of one process, counted per function and per category."""

    total: int = 0
    self_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    categories: collections.Counter[str] = field(default_factory=collections.Counter)


def count_samples(text: str) -> Samples:
    """Count collapsed stacks (`py-spy record --format raw`), idle threads left out."""
    samples = Samples()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(f) for f in stack.split(";")]
        if frames[-1][0] in IDLE_FUNCTIONS and frames[-1][1].endswith("threading.py"):
            continue  # a thread asleep between batches, which py-spy samples as active
        samples.total += count
        names = [f"{func} ({file})" for func, file in frames]
        # py-spy puts the thread first, the innermost frame last.
        innermost = LOOP_SELF if frames[-1] in LOOP_RUNNERS else names[-1]
        samples.self_counts[innermost] += count
        for name in set(names):
            samples.inclusive[name] += count
        samples.categories[categorize(frames)] += count
    return samples


def collapse_summary(text: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function and per category from collapsed stacks."""
    samples = count_samples(text)
    total = samples.total
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "self": [(name, share(n)) for name, n in samples.self_counts.most_common(top)],
        "inclusive": [(name, share(n)) for name, n in samples.inclusive.most_common(top)],
        "categories": [(label, share(n)) for label, n in samples.categories.most_common()],
    }


def write_profile_summary(collapsed: Path, out: Path) -> dict[str, Any]:
    summary = collapse_summary(collapsed.read_text(errors="replace"))
    lines = [f"py-spy samples (CPU, idle excluded): {summary['samples']}", ""]
    lines += ["| category (innermost frame) | % of samples |", "|---|---:|"]
    lines += [f"| {label} | {pct} |" for label, pct in summary["categories"]]
    lines += ["", "| function (self time) | % |", "|---|---:|"]
    lines += [f"| `{name}` | {pct} |" for name, pct in summary["self"]]
    lines += ["", "| function (inclusive) | % |", "|---|---:|"]
    lines += [f"| `{name}` | {pct} |" for name, pct in summary["inclusive"]]
    out.write_text("\n".join(lines) + "\n")
    return summary


def profile_gap(
    bridge: Samples, floor: Samples, bridge_us: float, floor_us: float, top: int = 20
) -> dict[str, Any]:
    """Where the bridge's CPU per callback goes beyond the floor's, in µs per callback:
    each profile's sample shares times its target's CPU per callback."""

    def rows(
        ours: collections.Counter[str], theirs: collections.Counter[str]
    ) -> list[tuple[str, float, float, float]]:
        found = []
        for name in ours.keys() | theirs.keys():
            mine = bridge_us * ours[name] / bridge.total if bridge.total else 0.0
            base = floor_us * theirs[name] / floor.total if floor.total else 0.0
            found.append((name, round(mine, 1), round(base, 1), round(mine - base, 1)))
        return sorted(found, key=lambda row: (-row[3], row[0]))

    limit_us = CPU_LIMIT_VS_FLOOR * floor_us
    return {
        "bridge_us": round(bridge_us, 1),
        "floor_us": round(floor_us, 1),
        "limit_us": round(limit_us, 1),
        "to_cut_us": round(max(0.0, bridge_us - limit_us), 1),
        "categories": rows(bridge.categories, floor.categories),
        "functions": rows(bridge.self_counts, floor.self_counts)[:top],
    }


def write_profile_gap(
    bridge_collapsed: Path, floor_collapsed: Path, results: Mapping[str, Any], out: Path
) -> dict[str, Any] | None:
    """`profile_gap` as Markdown, when this run measured both targets at 64 connections."""
    summary = results.get("summary", {})
    cpu = [summary.get(t, {}).get(TARGET_CONNECTIONS, {}).get("cpu_s_per_1k") for t in GAP_TARGETS]
    if None in cpu:
        return None
    bridge_us, floor_us = (ms * 1000 for ms in cpu)
    gap = profile_gap(
        count_samples(bridge_collapsed.read_text(errors="replace")),
        count_samples(floor_collapsed.read_text(errors="replace")),
        bridge_us,
        floor_us,
    )
    beyond = gap["bridge_us"] - gap["floor_us"]
    cut_share = f", {100 * gap['to_cut_us'] / beyond:.0f} % of" if beyond > 0 else " of"
    lines = [
        f"CPU per callback at {TARGET_CONNECTIONS} connections, this run's medians: the bridge "
        f"{gap['bridge_us']:.0f} µs, the floor {gap['floor_us']:.0f} µs "
        f"({gap['bridge_us'] / gap['floor_us']:.2f} x). Issue 14's limit, "
        f"{CPU_LIMIT_VS_FLOOR} x the floor, is {gap['limit_us']:.0f} µs: "
        f"{gap['to_cut_us']:.0f} µs to cut{cut_share} the {beyond:.0f} µs the bridge "
        "spends beyond the floor.",
        "",
        "Each column is its profile's sample shares (py-spy, wrk at "
        f"{TARGET_CONNECTIONS} connections, after the measured runs) times its target's "
        "CPU per callback.",
        "",
        "| category (innermost frame) | bridge µs | floor µs | bridge - floor µs |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {b} | {f} | {d} |" for name, b, f, d in gap["categories"]),
        "",
        "| function (self time), largest differences first | bridge µs | floor µs "
        "| bridge - floor µs |",
        "|---|---:|---:|---:|",
        *(f"| `{name}` | {b} | {f} | {d} |" for name, b, f, d in gap["functions"]),
    ]
    out.write_text("\n".join(lines) + "\n")
    return gap
