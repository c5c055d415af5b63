"""Fault-injection harness: the bridge as its own process (the real CLI), a broker process,
load shaped like Luma's (`luma_load`, or `simulate`), and an audit of the lifecycle topic
against what was answered 200: missing, order violations, duplicates and regressions.

`audit_lifecycle(records, arrivals)` is the audit on its own: give it the records read
from `{prefix}.lifecycle` and the arrival log of `run_load`; it needs no bridge.

Broker outages are made by freezing the broker (SIGSTOP/SIGCONT) or by a TCP proxy in
front of it that can delay or cut traffic; never by restarting it, since the embedded
broker keeps everything in memory and a restart would lose data that is not ours to lose.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from aiokafka import ConsumerRecord

from bridge.devtools.embedded import free_port
from tests.helpers import AdminProcess, consume

TOKEN = "fault-token-0123456789"
#: How long each scenario's outage lasts (`make faults`: 30 s; the suite: 5 s).
OUTAGE = float(os.environ.get("FAULT_OUTAGE_SECONDS", "5"))


#: How far along its life a state is (as `GenerationConsumer` ranks them).
PROGRESS = {"queued": 0, "dreaming": 1, "completed": 2, "failed": 2}
#: Arrival order is the bridge's own: each record carries the `luma-received-at` stamp
#: (ms) of the request that wrote it, taken in the same step that queues it.


@dataclass
class Audit:
    """What a scenario sent, what was acknowledged and what Kafka holds."""

    scenario: str
    sent: int = 0
    acknowledged: int = 0
    answered_non_200: int = 0
    found_in_kafka: int = 0
    missing: int = 0
    duplicates: int = 0
    order_violations: int = 0
    regressions: int = 0
    regressions_by_bridge: int = 0
    ordered_pairs_checked: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Arrival:
    """One callback answered 200: which state of which generation, and when (monotonic)."""

    event_id: str
    generation: str
    state: str
    sent: float
    answered: float


@dataclass(frozen=True)
class Landed:
    """One record read from the lifecycle topic."""

    event_id: str
    generation: str
    state: str
    partition: int
    offset: int
    received_at: str = ""  # the bridge's luma-received-at stamp (RFC 3339, ms)


@dataclass(frozen=True)
class OrderAudit:
    """The lifecycle topic judged against the arrivals."""

    missing: int
    order_violations: int
    duplicates: int
    regressions: int
    found: int
    ordered_pairs_checked: int
    regressions_by_bridge: int = 0


def landed_from(records: list[ConsumerRecord]) -> list[Landed]:
    """Lifecycle records as `Landed` (event id and state from the bridge's headers)."""
    landed = []
    for record in records:
        headers = {name: value.decode() for name, value in record.headers}
        landed.append(
            Landed(
                headers["luma-event-id"],
                record.key.decode(),
                headers.get("luma-state", ""),
                record.partition,
                record.offset,
                headers.get("luma-received-at", ""),
            )
        )
    return landed


def audit_lifecycle(
    records: list[ConsumerRecord] | list[Landed], arrivals: list[Arrival]
) -> OrderAudit:
    """Judge what the lifecycle topic holds against what was answered 200.

    missing: acknowledged event ids not on the topic.
    duplicates: records beyond the first per event id.
    order_violations: records, read in partition order, that the bridge received before
      a record of their generation already written (by the `luma-received-at` stamp of
      the attempt that wrote each, in ms): a later callback overtook an earlier one, or
      a copy of an earlier one came after a later one. Callbacks the bridge read in the
      same millisecond have no order anyone could keep and are not judged.
    regressions: records, read in partition order as a plain consumer reads them, whose
      state is earlier than a state already seen for their generation.
    regressions_by_bridge: those of them the bridge received before the state they
      follow (by its `luma-received-at` stamps): a re-send or a reordering of its own. The
      others arrived in that order (Luma's, or the load's, delivery order), which no
      bridge can undo; `GenerationConsumer` flags them stale.
    """
    landed = [r if isinstance(r, Landed) else landed_from([r])[0] for r in records]
    landed.sort(key=lambda r: (r.partition, r.offset))
    by_generation: dict[str, list[Landed]] = {}
    for record in landed:
        by_generation.setdefault(record.generation, []).append(record)
    ids = [record.event_id for record in landed]
    acked = {arrival.event_id for arrival in arrivals}
    regressions, by_bridge = 0, 0
    for history in by_generation.values():
        furthest: Landed | None = None
        for record in history:
            rank = PROGRESS.get(record.state, -1)
            if furthest is not None and rank < PROGRESS.get(furthest.state, -1):
                regressions += 1
                if record.received_at < furthest.received_at:
                    by_bridge += 1  # received first, written after: the bridge's doing
            elif furthest is None or rank > PROGRESS.get(furthest.state, -1):
                furthest = record
    violations, checked = 0, 0
    for history in by_generation.values():
        latest = ""
        for record in history:
            if not record.received_at:
                continue
            if latest and record.received_at != latest:
                checked += 1
                if record.received_at < latest:
                    violations += 1  # received before one already written: overtaken
            latest = max(latest, record.received_at)
    return OrderAudit(
        missing=len(acked - set(ids)),
        order_violations=violations,
        duplicates=len(ids) - len(set(ids)),
        regressions=regressions,
        regressions_by_bridge=by_bridge,
        found=len(acked & set(ids)),
        ordered_pairs_checked=checked,
    )


class BridgeProcess(AdminProcess):
    """`luma-kafka-bridge serve` in a subprocess, with its own ports and spool."""

    name = "bridge"

    def __init__(self, bootstrap: str, *, spool_dir: Path, prefix: str, **settings: Any) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.spool_dir = spool_dir
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="bridge-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/luma/callback/{TOKEN}"

    def start(self) -> BridgeProcess:
        flags = {
            "kafka_bootstrap_servers": self.bootstrap,
            "kafka_enable_idempotence": "false",
            "host": "127.0.0.1",
            "port": self.port,
            "admin_port": self.admin_port,
            "auth_tokens": TOKEN,
            "topic_prefix": self.prefix,
            "spool_dir": self.spool_dir,
            "log_format": "json",
            "log_level": "WARNING",
            "drain_delay": 0,
            **self.settings,
        }
        argv = [sys.executable, "-m", "bridge", "serve"]
        for name, value in flags.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        env = dict(os.environ)
        other_build = os.environ.get("FAULT_BRIDGE_SOURCE")
        if other_build:
            # Audit another checkout's bridge with the same scenarios (e.g. main's, to show
            # that a scenario fails there). Run from there too: `-m` looks in the working
            # directory before PYTHONPATH, and ours holds this checkout's bridge.
            env["PYTHONPATH"] = other_build
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=other_build or None
        )
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return Path(self.log.name).read_text()[-4000:]


#: The loggers of aiokafka's client and producer sender, whose repeats the bridge holds back.
AIOKAFKA_LOGGERS = ("aiokafka", "aiokafka.producer.sender")


def aiokafka_lines(log: Path) -> list[dict[str, str]]:
    """The aiokafka lines of a bridge's JSON log."""
    lines = [json.loads(text) for text in log.read_text().splitlines() if text.startswith("{")]
    return [line for line in lines if line.get("logger") in AIOKAFKA_LOGGERS]


def line_kind(message: str) -> str:
    """A line's fixed opening, without its numbers and without the count of lines held
    back (`RepeatedLines`): the same for every node and error."""
    opening = re.sub(r" \(\d+ more like this.*", "", message).split(":")[0]
    return re.sub(r"\d+", "N", opening)


def repeated_within_window(lines: list[dict[str, str]], window: float) -> dict[str, int]:
    """The kinds of line logged more than once per `window` seconds (the first one
    included), with how many there were."""
    times: dict[str, list[datetime]] = {}
    for line in lines:
        times.setdefault(line_kind(line["message"]), []).append(
            datetime.fromisoformat(line["time"])
        )
    too_many = {}
    for kind, seen in times.items():
        span = (max(seen) - min(seen)).total_seconds()
        if len(seen) > span // window + 1:
            too_many[kind] = len(seen)
    return too_many


class HasPid(Protocol):
    """A process to freeze: an `EmbeddedBroker`, a `Popen` (a Kafka node)."""

    @property
    def pid(self) -> int: ...


@contextmanager
def frozen(*processes: HasPid) -> Iterator[None]:
    """These processes stopped dead (SIGSTOP) for the duration, then resumed."""
    for process in processes:
        os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            os.kill(process.pid, signal.SIGCONT)


async def output_of(argv: list[str]) -> tuple[bytes, bytes]:
    """A load generator's stdout and stderr once it ends; killed if the scenario ends first
    (a failed one), so it does not outlive the test hammering a bridge that is gone."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        return await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise


async def run_simulate(
    url: str, count: int, *, concurrency: int = 8, rate: float | None = None, seed: int = 7
) -> tuple[dict[str, Any], list[str]]:
    """`luma-kafka-bridge simulate` as a subprocess; returns its summary and the acked event ids."""
    ids_file = Path(tempfile.mkdtemp()) / "acked.txt"
    argv = [
        sys.executable,
        "-m",
        "bridge",
        "simulate",
        "--url",
        url,
        "--count",
        str(count),
        "--concurrency",
        str(concurrency),
        "--seed",
        str(seed),
        "--json",
        "--quiet",
        "--event-ids",
        str(ids_file),
    ]
    if rate:
        argv += ["--rate", str(rate)]
    out, err = await output_of(argv)
    if not out.strip():
        raise AssertionError(f"simulate printed nothing: {err.decode()[-2000:]}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return summary, ids_file.read_text().split()


async def event_ids_in_kafka(
    bootstrap: str, topic: str, *, expect: set[str], timeout: float = 60.0
) -> list[str]:
    """Every `luma-event-id` on `topic`, read until all of `expect` are seen or `timeout`."""

    def ids(records: list[ConsumerRecord]) -> list[str]:
        return [dict(record.headers)["luma-event-id"].decode() for record in records]

    # Read on until a poll brings nothing new, so late duplicates are counted too.
    records = await consume(
        bootstrap, topic, done=lambda rs, idle: idle and expect <= set(ids(rs)), timeout=timeout
    )
    return ids(records)


def audit(scenario: str, summary: dict[str, Any], acked: list[str], found: list[str]) -> Audit:
    unique = set(found)
    result = Audit(
        scenario=scenario,
        sent=summary["sent"],
        acknowledged=len(set(acked)),
        answered_non_200=sum(n for s, n in summary["statuses"].items() if s != "200"),
        found_in_kafka=len(unique & set(acked)),
        missing=len(set(acked) - unique),
        duplicates=len(found) - len(unique),
        statuses=summary["statuses"],
    )
    write_report_line(result.as_dict())
    return result


async def run_load(
    url: str, generations: int, *, rate: float = 20.0, gap: float = 0.15, seed: int = 7
) -> tuple[dict[str, Any], list[Arrival]]:
    """`luma_load` as a subprocess: Luma's independent state deliveries; the arrival log."""
    arrivals_file = Path(tempfile.mkdtemp()) / "arrivals.jsonl"
    argv = [sys.executable, "-m", "tests.faults.luma_load", "--url", url]
    argv += ["--generations", str(generations), "--rate", str(rate), "--gap", str(gap)]
    argv += ["--seed", str(seed), "--arrivals", str(arrivals_file)]
    out, err = await output_of(argv)
    if not out.strip():
        raise AssertionError(f"luma_load printed nothing: {err.decode()[-2000:]}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    arrivals = [
        Arrival(e["event_id"], e["generation"], e["state"], e["sent"], e["answered"])
        for e in map(json.loads, arrivals_file.read_text().splitlines())
        if e["status"] == "200"
    ]
    return summary, arrivals


async def lifecycle_records(
    bootstrap: str, topic: str, *, expect: set[str], timeout: float = 90.0
) -> list[ConsumerRecord]:
    """The records of `topic`, read until every id of `expect` is seen and a poll is idle."""

    def seen(records: list[ConsumerRecord]) -> set[str]:
        return {dict(record.headers)["luma-event-id"].decode() for record in records}

    return await consume(
        bootstrap, topic, done=lambda rs, idle: idle and expect <= seen(rs), timeout=timeout
    )


def report(
    scenario: str, summary: dict[str, Any], arrivals: list[Arrival], found: OrderAudit
) -> Audit:
    """The scenario's numbers, printed and appended to FAULT_REPORT (the README's table)."""
    result = Audit(
        scenario=scenario,
        sent=summary["sent"],
        acknowledged=len({a.event_id for a in arrivals}),
        answered_non_200=sum(n for s, n in summary["statuses"].items() if s != "200"),
        found_in_kafka=found.found,
        missing=found.missing,
        duplicates=found.duplicates,
        order_violations=found.order_violations,
        regressions=found.regressions,
        regressions_by_bridge=found.regressions_by_bridge,
        ordered_pairs_checked=found.ordered_pairs_checked,
        statuses=summary["statuses"],
    )
    write_report_line(result.as_dict())
    return result


def write_report_line(numbers: dict[str, Any]) -> None:
    """Print a scenario's numbers and append them, with the outage length and the code's
    commit, to FAULT_REPORT."""
    line = json.dumps({**numbers, "outage_s": OUTAGE, "commit": checkout()})
    report_file = os.environ.get("FAULT_REPORT")
    if report_file:
        with open(report_file, "a") as out:
            out.write(line + "\n")
    print(line)


def checkout(where: Path = Path(__file__).parent) -> str:
    """The commit the scenarios run, `-dirty` when the bridge or the tests differ from it in
    the working tree (the bridges run from there), or "unknown" outside a git checkout."""
    head = _git(where, "rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    changed = _git(where, "status", "--porcelain", "--untracked-files=no", ":/bridge", ":/tests")
    return f"{head}-dirty" if changed else head


def _git(where: Path, *args: str) -> str:
    """What git printed, or "" when it failed or is missing."""
    try:
        found = subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, check=False
        )
    except OSError:
        return ""
    return found.stdout.strip() if found.returncode == 0 else ""


def new_prefix() -> str:
    return f"fault.{uuid.uuid4().hex[:10]}"


class DelayingProxy:
    """A TCP proxy in front of the broker that can hold back the broker's answers."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> DelayingProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _connect(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        for pump in (
            self._pump(client_r, broker_w, delayed=False),
            self._pump(broker_r, client_w, delayed=True),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if delayed and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
