"""Running the benchmark: processes, pinning, sampling, and the interleaved schedule.

Everything here is I/O; the arithmetic lives in `bench.stats` (tested without a
network). One broker and one set of servers serve the whole run, so every target
is measured against the same broker in the same conditions; runs are interleaved
(target order rotates each repeat) so slow drift, such as the memory-only broker
filling up, spreads over all targets instead of penalising the last one.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.layout import Layout
from bench.stats import BASELINE
from bridge.devtools.embedded import find_broker_binary, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = ROOT / "bench" / "wrk" / "callbacks.lua"
TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway token for a loopback server
CALLBACK_PATH = "/luma/callback"


def pinned(command: Sequence[str], cpus: frozenset[int]) -> list[str]:
    """`taskset -c ...` in front of `command` when pinning is asked for and possible."""
    taskset = shutil.which("taskset")
    if not cpus or taskset is None:
        return list(command)
    return [taskset, "-c", ",".join(str(c) for c in sorted(cpus)), *command]


def pin_self(cpus: frozenset[int]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


class Service:
    """A long-lived process (broker or server) with its log in `logs_dir`."""

    def __init__(self, name: str, command: Sequence[str], logs_dir: Path, port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = logs_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed commands
            list(command),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=logs_dir,
        )
        self.ps = psutil.Process(self.process.pid)

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if wait_for_port("127.0.0.1", self.port, time.monotonic() + 0.2):
                return
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not start listening on {self.port}:\n{tail}")

    def server_process(self) -> psutil.Process:
        """The process that serves (taskset execs, so it is the one we started)."""
        return self.ps

    def cpu_seconds(self) -> float:
        """CPU of the process and of its live children (`serve --workers N`'s workers)."""
        total = 0.0
        for process in (self.ps, *self.ps.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread; keeps peak and series."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self.series: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.series.append((time.monotonic(), rss))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: Each wrk invocation's number, which its script puts in every generation id: ids never
#: repeat across the runs of one benchmark, so the bridge's dedupe never answers one early.
_WRK_RUNS = itertools.count(1)


def run_wrk(
    url: str, templates: Path, connections: int, duration: float, cpus: frozenset[int]
) -> tuple[str, float]:
    """Run wrk once (one thread, pinned) and return its output and its CPU seconds."""
    command = pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            str(templates),
            str(next(_WRK_RUNS)),
        ],
        cpus,
    )
    before = children_cpu()
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-1000:]}")
    return done.stdout, children_cpu() - before


def run_json_tool(command: Sequence[str], cpus: frozenset[int], sample_pid: bool = False) -> Any:
    """Run a `python -m bench.*` tool that prints one JSON line; optionally sample its RSS."""
    process = subprocess.Popen(  # noqa: S603 - our own fixed commands
        pinned(command, cpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    if sample_pid:
        with RssSampler(process.pid) as sampler:
            stdout, stderr = process.communicate()
        peak = sampler.peak
    else:
        stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command[2]} failed: {stderr[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    if sample_pid:
        result["peak_rss_mb"] = peak / 2**20
    return result


class ApacheKafkaBroker:
    """One Apache Kafka node (KRaft, controller and broker in one `java` process, data on
    disk) from the test suite's launcher, in the place of the Tansu `Service`."""

    def __init__(self, workdir: Path, cpus: frozenset[int]) -> None:
        from tests.kafka.launcher import KafkaCluster

        self.name = "broker"
        self.cluster = KafkaCluster.combined(workdir / "apache-kafka")
        # The node inherits this process's CPUs: the broker's while it starts.
        mine = os.sched_getaffinity(0)
        pin_self(cpus)
        try:
            self.cluster.start()
        finally:
            pin_self(frozenset(mine))
        self.port = int(self.cluster.bootstrap.rsplit(":", 1)[1])
        self.ps = psutil.Process(self.cluster.nodes[0].process.pid)  # type: ignore[union-attr]

    @property
    def version(self) -> str:
        return f"apache-kafka-{self.cluster.version}"

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self.cluster.stop()
        self.cluster.remove()


@dataclass
class Stack:
    """The broker and the HTTP targets, running for the whole benchmark."""

    layout: Layout
    workdir: Path
    #: `tansu` (memory only, no idempotent producer) or `apache` (Apache Kafka, one node).
    broker: str = "tansu"
    broker_port: int = 0
    bridge_args: Sequence[str] = ()
    #: Extra bridge targets, `bridge:NAME`, each with its own extra `serve` flags.
    variants: dict[str, Sequence[str]] = field(default_factory=dict)
    #: A checkout of another revision's `bridge` package, run as `bridge:baseline`.
    baseline: Path | None = None
    services: dict[str, Service] = field(default_factory=dict)
    broker_service: Service | ApacheKafkaBroker | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.services[target].port}{CALLBACK_PATH}/{TOKEN}"

    @property
    def idempotent(self) -> bool:
        """The bridge's default (on) where the broker has the idempotent producer."""
        return self.broker == "apache"

    def start(self, targets: Sequence[str]) -> None:
        if self.broker == "apache":
            apache = ApacheKafkaBroker(self.workdir, self.layout.broker)
            self.broker_service = apache
            self.broker_port = apache.port
        else:
            self._start_tansu()
        self._start_targets(targets)

    def _start_tansu(self) -> None:
        self.broker_port = free_port()
        listener = f"tcp://{self.bootstrap}"
        broker = Service(
            "broker",
            pinned(
                [
                    str(find_broker_binary()),
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    listener,
                ],
                self.layout.broker,
            ),
            self.workdir,
            self.broker_port,
        )
        self.broker_service = broker
        broker.wait_listening()

    def _start_targets(self, targets: Sequence[str]) -> None:
        logs = self.workdir
        subprocess.run(  # noqa: S603 - our own CLI
            [
                sys.executable,
                "-m",
                "bridge",
                "topics",
                "create",
                "--kafka-bootstrap-servers",
                self.bootstrap,
                "--topic-replication-factor",
                "1",
                "--log-format",
                "text",
            ],
            check=True,
            capture_output=True,
        )
        py = sys.executable
        commands = {
            "minimal": lambda port: [py, "-m", "bench.minimal", "--port", str(port)],
            "floor": lambda port: [
                *(py, "-m", "bench.floor", "--port", str(port), "--bootstrap", self.bootstrap),
                *(["--idempotent"] if self.idempotent else []),
            ],
            "floor_gc": lambda port: [
                *(py, "-m", "bench.floor", "--port", str(port), "--bootstrap", self.bootstrap),
                *(["--idempotent"] if self.idempotent else []),
                "--gc-tuned",
            ],
            "naive": lambda port: [
                *(py, "-m", "bench.floor", "--port", str(port), "--bootstrap", self.bootstrap),
                "--naive",
            ],
            "peer": lambda port: [
                *(py, "-m", "bench.peers.fastapi_peer", "--port", str(port)),
                *("--bootstrap", self.bootstrap, "--token", TOKEN),
            ],
            "bridge": lambda port: self._bridge_command(port, self.bridge_args),
        }
        for name, extra in self.variants.items():
            commands[f"bridge:{name}"] = functools.partial(
                self._bridge_command, extra=[*self.bridge_args, *extra]
            )
        if self.baseline is not None:
            # Servers run in the scratch directory, so this path is the first with `bridge`.
            pythonpath = f"PYTHONPATH={self.baseline}"
            commands[BASELINE] = lambda port: [
                "env",
                pythonpath,
                *self._bridge_command(port, self.bridge_args),
            ]
        env_root = str(ROOT)
        os.environ["PYTHONPATH"] = env_root + os.pathsep + os.environ.get("PYTHONPATH", "")
        for target in targets:
            if target not in commands:
                continue
            port = free_port()
            self.services[target] = Service(
                target, pinned(commands[target](port), self.layout.server), logs, port
            )
        for target in targets:
            if target in self.services:
                self.services[target].wait_listening()

    def _bridge_command(self, port: int, extra: Sequence[str]) -> list[str]:
        spool = self.workdir / f"spool-{port}"
        return [
            *(sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1", "--port", str(port)),
            *("--admin-port", str(free_port()), "--auth-tokens", TOKEN),
            *("--kafka-bootstrap-servers", self.bootstrap),
            *("--kafka-enable-idempotence", str(self.idempotent).lower()),
            *("--log-format", "json"),
            # Shutdown and storage only, not the hot path: no 5 s wait at the end,
            # and the spool stays in the scratch directory (one per bridge).
            *("--drain-delay", "0", "--spool-dir", str(spool)),
            *extra,
        ]

    def stop(self) -> None:
        for name in reversed(list(self.services)):
            with contextlib.suppress(Exception):
                self.services[name].stop()
        self.services.clear()
        if self.broker_service is not None:
            with contextlib.suppress(Exception):
                self.broker_service.stop()
            self.broker_service = None


@contextlib.contextmanager
def running_stack(
    layout: Layout,
    workdir: Path,
    targets: Sequence[str],
    bridge_args: Sequence[str] = (),
    variants: dict[str, Sequence[str]] | None = None,
    broker: str = "tansu",
    baseline: Path | None = None,
) -> Iterator[Stack]:
    stack = Stack(
        layout,
        workdir,
        broker=broker,
        bridge_args=bridge_args,
        variants=dict(variants or {}),
        baseline=baseline,
    )
    try:
        stack.start(targets)
        yield stack
    finally:
        stack.stop()


def measure_http(
    stack: Stack, target: str, templates: Path, connections: int, duration: float
) -> dict[str, Any]:
    """One closed-loop wrk run against `target`, with the server's CPU and peak RSS."""
    from bench.stats import parse_wrk

    service = stack.services[target]
    cpu_before = service.cpu_seconds()
    with RssSampler(service.process.pid) as sampler:
        output, wrk_cpu = run_wrk(
            stack.url(target), templates, connections, duration, stack.layout.loadgen
        )
    cpu = service.cpu_seconds() - cpu_before
    result = parse_wrk(output)
    ok = max(1, result["requests"] - result["errors"]["status"])
    result.update(
        cpu_s=cpu,
        cpu_s_per_1k=cpu / ok * 1000,
        server_cpu_util=cpu / result["duration_s"],
        loadgen_cpu_util=wrk_cpu / result["duration_s"],
        peak_rss_mb=sampler.peak / 2**20,
    )
    return result


def measure_raw_producer(
    stack: Stack,
    templates: Path,
    connections: int,
    duration: float,
    *,
    rate: float = 0.0,
    linger_ms: int = 0,
) -> dict[str, Any]:
    """One run of the raw producer at `connections` callbacks in flight (or open loop at
    `rate` callbacks per second), on the server's core."""
    result: dict[str, Any] = run_json_tool(
        [
            *(sys.executable, "-m", "bench.rawproducer", "--bootstrap", stack.bootstrap),
            *("--templates", str(templates), "--concurrency", str(connections)),
            *("--duration", str(duration), "--warmup", "1"),
            *("--rate", str(rate), "--linger-ms", str(linger_ms)),
        ],
        stack.layout.server,
        sample_pid=True,
    )
    result["cpu_s_per_1k"] = result["cpu_s"] / max(1, result["requests"]) * 1000
    result["server_cpu_util"] = result["cpu_s"] / result["duration_s"]
    result["loadgen_cpu_util"] = 0.0
    return result


def measure_open_loop(
    stack: Stack, target: str, templates: Path, rate: int, duration: float
) -> dict[str, Any]:
    """One open-loop run at `rate` requests/s, with the server's CPU and peak RSS."""
    service = stack.services[target]
    broker = stack.broker_service
    assert broker is not None
    broker_before = broker.cpu_seconds()
    cpu_before, wall_before = service.cpu_seconds(), time.monotonic()
    with RssSampler(service.process.pid) as sampler:
        result: dict[str, Any] = run_json_tool(
            [
                *(sys.executable, "-m", "bench.openloop", "--url", stack.url(target)),
                *("--templates", str(templates), "--rate", str(rate)),
                *("--duration", str(duration), "--warmup", "1"),
            ],
            stack.layout.loadgen,
        )
    cpu = service.cpu_seconds() - cpu_before
    wall = time.monotonic() - wall_before
    answered = max(1, result["answered"])
    result.update(
        broker_cpu_util=(broker.cpu_seconds() - broker_before) / wall,
        loadgen_cpu_util=result.get("loadgen_cpu_s", 0.0) / wall,
        # Over the tool's whole life (warm-up and drain included), so it is a lower bound.
        server_cpu_util=cpu / (time.monotonic() - wall_before),
        cpu_s_per_1k=cpu / (answered * (duration + 1) / duration) * 1000,
        peak_rss_mb=sampler.peak / 2**20,
    )
    return result


def tracing_off_cost(cpus: frozenset[int]) -> dict[str, Any]:
    """`bench.tracingcost` on the server's core: µs per callback of the tracing-off path."""
    result: dict[str, Any] = run_json_tool(
        [sys.executable, "-m", "bench.tracingcost"], cpus, sample_pid=False
    )
    return result


def soak(
    stack: Stack, target: str, templates: Path, total: int, chunk_s: float = 10.0
) -> dict[str, Any]:
    """wrk at 64 connections in `chunk_s` slices until `total` callbacks; RSS after each."""
    from bench.stats import flatness, parse_wrk

    service = stack.services[target]
    done_requests, points = 0, []
    started = time.monotonic()
    while done_requests < total:
        output, _ = run_wrk(stack.url(target), templates, 64, chunk_s, stack.layout.loadgen)
        parsed = parse_wrk(output)
        done_requests += parsed["requests"]
        points.append(
            {
                "callbacks": done_requests,
                "rss_mb": service.ps.memory_info().rss / 2**20,
                "rps": parsed["rps"],
                "p99_ms": parsed["latency_ms"]["p99"],
                "errors": parsed["errors"]["total"],
            }
        )
    rss = [p["rss_mb"] for p in points]
    return {
        "target": target,
        "callbacks": done_requests,
        "seconds": time.monotonic() - started,
        "points": points,
        "rss_second_half_spread": flatness(rss),
    }


def profile(
    stack: Stack, target: str, templates: Path, seconds: float, out: Path
) -> dict[str, Any]:
    """py-spy (raw, collapsed stacks) on `target` while wrk drives it at 64 connections."""
    pid = stack.services[target].process.pid
    raw = out.with_suffix(".txt")
    recorder = subprocess.Popen(  # noqa: S603 - fixed command
        pinned(
            [
                py_spy_binary(),
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--duration",
                str(round(seconds)),
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stack.layout.loadgen,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    output, _ = run_wrk(stack.url(target), templates, 64, seconds, stack.layout.loadgen)
    _, stderr = recorder.communicate(timeout=60)
    if recorder.returncode != 0:
        raise RuntimeError(f"py-spy failed: {stderr.decode()[-1000:]}")
    return {"collapsed": str(raw), "wrk": parse_wrk_safe(output)}


def py_spy_binary() -> str:
    """py-spy from this interpreter's environment (not always on PATH), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def parse_wrk_safe(output: str) -> dict[str, Any] | None:
    from bench.stats import parse_wrk

    try:
        return parse_wrk(output)
    except ValueError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("aiohttp", "aiokafka", "uvloop", "pydantic", "fastapi", "uvicorn"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)  # noqa: S607
    broker = str(find_broker_binary())
    head = subprocess.run(  # noqa: S603 - fixed command
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(  # noqa: S603 - fixed command
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "bridge"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "bridge_commit": head + ("+uncommitted bridge/ changes" if dirty else ""),
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        # The machine may be shared: the load before the run says how busy it was.
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "",
        "broker": Path(broker).name,
    }
