"""`python -m bench`: run the whole benchmark and write results/latest.{json,md,png}.

Default: 6 targets x 4 connection counts x 3 repeats x 8 s, interleaved, then the
open-loop latency curves of the bridge and the floor app; about 17 minutes on 2 cores.
`--quick` is one repeat of 3 s (about 3 minutes). `--soak N` adds an N-callback run of the bridge to
check that its memory stays flat; `--profile S` records S seconds of py-spy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.baseline import BaselineError, check_out_baseline
from bench.stats import BASELINE

NEEDED = {
    "psutil": "psutil",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn[standard]",
    "matplotlib": "matplotlib",
    "uvloop": "uvloop",
}
TARGETS = ("minimal", "floor", "naive", "raw_producer", "peer", "bridge")
#: Asked for by name only: the floor with the garbage collector tuned as `serve` tunes it.
EXTRA_TARGETS = ("floor_gc",)
#: Targets whose open-loop curve is measured, at the same offered rates.
OPEN_LOOP_TARGETS = ("bridge", "floor")
CONNECTIONS = (1, 16, 64, 256)
OPEN_LOOP_FRACTIONS = (0.1, 0.25, 0.5, 0.7, 0.85, 1.0, 1.15)


def ensure_dependencies(install: bool) -> None:
    """The benchmark's own dependencies (the `bench` extra); installed when missing in a venv."""
    missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        missing.append("py-spy")
    if missing:
        in_venv = sys.prefix != sys.base_prefix
        if not (install and in_venv):
            sys.exit(
                f"bench: missing {', '.join(missing)}; "
                f"run: {sys.executable} -m pip install -e '.[bench]'"
            )
        print(f"bench: installing {', '.join(missing)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)  # noqa: S603
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing; install it with `apt-get install -y wrk` (Debian)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 s (about 2 min)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (8)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell (3)")
    parser.add_argument(
        "--connections",
        default=",".join(map(str, CONNECTIONS)),
        help="comma-separated connection counts (1,16,64,256)",
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated subset of the default"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    parser.add_argument("--no-open-loop", action="store_true", help="skip the latency curve")
    parser.add_argument(
        "--open-loop-fractions",
        default=",".join(map(str, OPEN_LOOP_FRACTIONS)),
        help="offered rates as fractions of the bridge's closed-loop saturation "
        "(0.1,0.25,0.5,0.7,0.85,1.0,1.15)",
    )
    parser.add_argument(
        "--soak", type=int, default=0, metavar="N", help="then N callbacks into the bridge (RSS)"
    )
    parser.add_argument(
        "--profile", type=float, default=0, metavar="S", help="then S seconds of py-spy"
    )
    parser.add_argument(
        "--bridge-args",
        default="",
        help="extra `luma-kafka-bridge serve` flags, for experiments (default: none)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="an extra bridge target `bridge:NAME` run with these `serve` flags, interleaved "
        "with the others (repeatable), e.g. --variant 'linger5=--kafka-linger-ms 5'",
    )
    parser.add_argument(
        "--batching",
        action="store_true",
        help="then the raw producer open loop at the curve's rates, linger 0 and 5 ms: "
        "produce requests and CPU per callback (why open-loop arrivals cost more)",
    )
    parser.add_argument(
        "--broker",
        choices=("tansu", "apache"),
        default="tansu",
        help="tansu (embedded, memory only; the default) or apache: one Apache Kafka node "
        "(KRaft, from Maven Central like the test suite's; Java 17 and Maven), with the "
        "idempotent producer on for the bridge and the floor, as on a real cluster",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the bridge of git revision REV (a commit, branch or tag) as target "
        "`bridge:baseline`, interleaved with the others: a code change measured side by "
        "side, e.g. --baseline HEAD~1",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--no-install", action="store_true", help="never pip install")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.connections = [int(c) for c in args.connections.split(",")]
    args.open_loop_fractions = [float(f) for f in args.open_loop_fractions.split(",")]
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(TARGETS) - set(EXTRA_TARGETS)
    args.variants = {}
    for variant in args.variant:
        name, separator, flags = variant.partition("=")
        if not separator or not name:
            parser.error(f"--variant wants NAME=FLAGS, not {variant!r}")
        args.variants[name] = shlex.split(flags)
        args.targets.append(f"bridge:{name}")
    if args.baseline:
        args.targets.append(BASELINE)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the broker and servers are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ensure_dependencies(install=not args.no_install)
    import os

    from bench import harness, report, stats
    from bench.layout import Layout
    from bench.payloads import write_templates

    out: Path = args.out
    workdir = out / "tmp"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    templates = write_templates(workdir / "templates.txt")
    cpus = sorted(os.sched_getaffinity(0))
    layout = Layout.for_cpus([] if args.no_pin else cpus)
    harness.pin_self(layout.loadgen)
    started = time.monotonic()
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": harness.machine(),
        "layout": layout.describe(),
        "settings": {
            "duration_s": args.duration,
            "repeats": args.repeats,
            "connections": args.connections,
            "targets": args.targets,
            "body_bytes": [len(t.encode()) for t in templates.read_text().splitlines()],
        },
        "runs": [],
    }
    baseline = None
    if args.baseline:
        baseline = workdir / "baseline"
        try:
            commit = check_out_baseline(args.baseline, baseline, harness.ROOT)
        except BaselineError as exc:
            sys.exit(f"bench: {exc}")
        log(f"baseline: {args.baseline} ({commit[:12]}) checked out into {baseline}")
        results["settings"]["baseline"] = {"revision": args.baseline, "commit": commit}
    http_targets = [t for t in args.targets if t != "raw_producer"]
    log(f"starting broker and {', '.join(http_targets)} (layout {layout.describe()})")
    bridge_args = shlex.split(args.bridge_args)
    results["settings"]["bridge_args"] = bridge_args
    results["settings"]["variants"] = args.variants
    results["settings"]["broker"] = args.broker
    with harness.running_stack(
        layout,
        workdir,
        http_targets,
        bridge_args,
        args.variants,
        broker=args.broker,
        baseline=baseline,
    ) as stack:
        if isinstance(stack.broker_service, harness.ApacheKafkaBroker):
            results["machine"]["broker"] = stack.broker_service.version
        for target in http_targets:
            log(f"warming up {target}")
            harness.measure_http(stack, target, templates, 64, 2)
        total = args.repeats * len(args.connections) * len(args.targets)
        index = 0
        for repeat in range(args.repeats):
            shift = repeat % len(args.targets)
            order = args.targets[shift:] + args.targets[:shift]
            for connections in args.connections:
                for target in order:
                    index += 1
                    if target == "raw_producer":
                        run = harness.measure_raw_producer(
                            stack, templates, connections, args.duration
                        )
                    else:
                        run = harness.measure_http(
                            stack, target, templates, connections, args.duration
                        )
                    run.update(target=target, connections=connections, repeat=repeat)
                    results["runs"].append(run)
                    log(
                        f"{index}/{total} {target:12} c={connections:<3} "
                        f"{run['rps']:8.0f} req/s  p99 {run['latency_ms']['p99']:7.2f} ms  "
                        f"cpu {run['cpu_s_per_1k']:.3f} s/1k  errors {run['errors']['total']}"
                    )
        summary = stats.summarize(results["runs"])
        results["summary"] = summary
        results["ratios"] = stats.ratios(summary, runs=results["runs"])
        results["variant_ratios"] = {
            target: stats.ratios(summary, subject=target, runs=results["runs"])
            for target in http_targets
            if target.startswith("bridge:")
        }
        if "bridge" in http_targets:
            results["tracing_off"] = harness.tracing_off_cost(layout.server)
            log(f"tracing off: {results['tracing_off']['cost_us_per_callback']:.2f} µs/callback")
        if "bridge" in http_targets and not args.no_open_loop:
            saturation = max(row["rps"] for row in summary["bridge"].values())
            results["saturation_rps"] = saturation
            results["open_loop"] = []
            curve_targets = [
                t for t in http_targets if t in OPEN_LOOP_TARGETS or t.startswith("bridge:")
            ]
            for rate in stats.rates_for(saturation, args.open_loop_fractions):
                for target in curve_targets:
                    point = harness.measure_open_loop(stack, target, templates, rate, args.duration)
                    point["target"] = target
                    point["fraction_of_saturation"] = rate / saturation
                    results["open_loop"].append(point)
                    lat = point["latency_ms"]
                    log(
                        f"open loop {target:6} {rate:6d} req/s offered: "
                        f"{point['achieved_rps']:7.0f} answered/s "
                        f"p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} p99.9 {lat['p999']:.2f} ms "
                        f"cpu {point['cpu_s_per_1k']:.3f} s/1k "
                        f"non-200 {point['answered'] - point['ok']} "
                        f"unanswered {point['unanswered_within_5s']}"
                    )
        if "bridge" in http_targets and args.soak:
            log(f"soak: {args.soak} callbacks into the bridge at 64 connections")
            results["soak"] = harness.soak(stack, "bridge", templates, args.soak)
            spread = results["soak"]["rss_second_half_spread"]
            log(f"soak RSS spread over the second half: {spread:.1%}")
        if args.batching and "saturation_rps" in results:
            results["batching"] = []
            for rate in stats.rates_for(results["saturation_rps"], args.open_loop_fractions):
                for linger in (0, 5):
                    point = harness.measure_raw_producer(
                        stack, templates, 0, args.duration, rate=rate, linger_ms=linger
                    )
                    point.update(rate=rate, linger_ms=linger)
                    results["batching"].append(point)
                    log(
                        f"batching: raw producer {rate:6d}/s linger {linger} ms: "
                        f"{point['produce_requests_per_callback']:.2f} produce requests and "
                        f"{point['cpu_s_per_1k']:.3f} CPU s per 1k callbacks, "
                        f"p99 {point['latency_ms']['p99']:.2f} ms"
                    )
        if args.profile:
            results["profile"] = {}
            for target in (t for t in OPEN_LOOP_TARGETS if t in http_targets):
                log(f"profiling {target} for {args.profile:.0f} s with py-spy")
                results["profile"][target] = harness.profile(
                    stack, target, templates, args.profile, out / f"profile-{target}"
                )
    results["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["targets_check"] = report.check_targets(results)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(
        json.dumps(report.sanitize(results), indent=1, allow_nan=False) + "\n"
    )
    markdown = report.markdown(results)
    (out / "latest.md").write_text(markdown)
    report.plot(results, out / "latest.png")
    profiled = {t: Path(p["collapsed"]) for t, p in results.get("profile", {}).items()}
    for target, collapsed in profiled.items():
        report.write_profile_summary(collapsed, out / f"profile-{target}.md")
    if profiled.keys() >= set(report.GAP_TARGETS):
        report.write_profile_gap(
            profiled["bridge"], profiled["floor"], results, out / "profile-gap.md"
        )
    print(markdown)
    log(f"done in {results['elapsed_s']:.0f} s; wrote {out}/latest.json, latest.md, latest.png")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
