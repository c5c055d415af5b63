"""`serve --workers N`: N bridge processes on one callback port, as N replicas in one pod.

Owns starting and supervising the worker processes, giving each its own spool directory
and operator port, and the operator listener in front of them: `/metrics` of every worker
with each sample labelled `worker`, `/readyz` ready when every worker is. A worker is the
ordinary `serve` command in a process of its own, so this module imports only settings.

The kernel spreads connections over the workers (SO_REUSEPORT), so a generation's
callbacks may reach different workers, exactly as they may reach different replicas:
per-generation order and redelivery dedupe hold within each worker, as within each pod.
Worker 0 keeps `SPOOL_DIR` itself and worker i uses `SPOOL_DIR/worker-i`; when N is
lowered, worker 0 (or the single process) drains the spools of the workers that are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from bridge.settings import Settings

log = logging.getLogger("bridge.ops.workers")

#: Set by the supervisor on each worker: "INDEX/COUNT/ADMIN_PORT".
WORKER_ENV = "LUMA_KAFKA_BRIDGE_WORKER"
#: A worker that exits with this code was refused its settings: restarting cannot help.
EXIT_USAGE = 2
RESTART_BACKOFF = 1.0
MAX_RESTART_BACKOFF = 30.0
PROBE_TIMEOUT = 2.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkersError(Exception):
    """`--workers` cannot run with these settings; the message says what to change."""


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Which of `serve --workers N`'s processes this one is."""

    index: int
    count: int
    admin_port: int

    def encode(self) -> str:
        return f"{self.index}/{self.count}/{self.admin_port}"


def worker_role(environ: Mapping[str, str]) -> WorkerRole | None:
    """The role the supervisor gave this process, or None when it runs on its own."""
    value = environ.get(WORKER_ENV)
    if not value:
        return None
    index, count, admin_port = (int(part) for part in value.split("/"))
    return WorkerRole(index, count, admin_port)


def spool_dir_of(root: Path, index: int) -> Path:
    """Worker 0 keeps SPOOL_DIR itself: going from one worker to N and back keeps its spool."""
    return root if index == 0 else root / f"worker-{index}"


def worker_settings(settings: Settings, role: WorkerRole) -> Settings:
    """`settings` as worker `role` runs them: its own spool directory and operator port."""
    return settings.model_copy(
        update={
            "spool_dir": spool_dir_of(settings.spool_dir, role.index),
            "admin_port": role.admin_port,
            "workers": 1,
        }
    )


def orphan_spool_dirs(spool_dir: Path, worker: WorkerRole | None) -> list[Path]:
    """Spool directories of workers beyond those running now, for worker 0 (or the only
    process) to drain: `spool_dir` is its own, the root."""
    if worker is not None and worker.index != 0:
        return []
    running = worker.count if worker is not None else 1
    found: list[tuple[int, Path]] = []
    for path in spool_dir.glob("worker-*"):
        suffix = path.name.removeprefix("worker-")
        if path.is_dir() and suffix.isdigit() and int(suffix) >= running:
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def retire_spool_dir(directory: Path) -> None:
    """Remove a gone worker's spool directory once it is empty of records."""
    shutil.rmtree(directory, ignore_errors=True)


def check_workers_settings(settings: Settings) -> None:
    if settings.port == 0:
        raise WorkersError(
            "--workers needs a fixed callback port (LUMA_BRIDGE_PORT): port 0 would give "
            "each worker a port of its own"
        )
    if settings.admin_port == 0:
        raise WorkersError("--workers needs a fixed operator port (LUMA_BRIDGE_ADMIN_PORT)")


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the supervisor dies, even by SIGKILL, so
    that no worker is left holding the port and its spool."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class _Worker:
    role: WorkerRole
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = RESTART_BACKOFF
    restarts: int = 0


class Supervisor:
    """Runs `serve` N times on one port, restarts a worker that dies, stops them together."""

    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        check_workers_settings(settings)
        self.settings = settings
        self._argv = list(argv)
        count = settings.workers
        self._workers = [_Worker(WorkerRole(i, count, _free_port())) for i in range(count)]
        self._stopping = asyncio.Event()
        self._admin: web.AppRunner | None = None
        self.exit_code = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        await self._open_admin()
        log.info(
            "starting workers",
            extra={"fields": {"workers": len(self._workers), "port": self.settings.port}},
        )
        try:
            for worker in self._workers:
                await self._start(worker)
            watchers = [asyncio.create_task(self._watch(worker)) for worker in self._workers]
            await self._stopping.wait()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            await self._stop_all()
            if self._admin is not None:
                await self._admin.cleanup()
        return self.exit_code

    async def _start(self, worker: _Worker) -> None:
        env = {**os.environ, WORKER_ENV: worker.role.encode()}
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", *self._argv, env=env, preexec_fn=_die_with_parent
        )
        worker.started = time.monotonic()

    async def _watch(self, worker: _Worker) -> None:
        """Restart `worker` whenever it exits, with a backoff; a refused start stops all."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if code == EXIT_USAGE:
                log.error(
                    "a worker refused its settings; stopping every worker",
                    extra={"fields": {"worker": worker.role.index}},
                )
                self.exit_code = EXIT_USAGE
                self._stopping.set()
                return
            if time.monotonic() - worker.started > 60:
                worker.backoff = RESTART_BACKOFF
            log.error(
                "a worker exited; restarting it",
                extra={
                    "fields": {
                        "worker": worker.role.index,
                        "exit_code": code,
                        "restart_in_s": worker.backoff,
                    }
                },
            )
            await asyncio.sleep(worker.backoff)
            worker.backoff = min(worker.backoff * 2, MAX_RESTART_BACKOFF)
            worker.restarts += 1
            await self._start(worker)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker; whatever still runs after SHUTDOWN_TIMEOUT + 1 s is killed."""
        running = [
            w.process
            for w in self._workers
            if w.process is not None and w.process.returncode is None
        ]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        waits = [process.wait() for process in running]
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout + 1):
                await asyncio.gather(*waits)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(process.wait() for process in running))

    # The operator listener in front of the workers ------------------------------------

    async def _open_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._admin = web.AppRunner(app, access_log=None)
        await self._admin.setup()
        site = web.TCPSite(
            self._admin, self.settings.host, self.settings.admin_port, reuse_address=True
        )
        try:
            await site.start()
        except OSError as exc:
            raise WorkersError(
                f"cannot listen on {self.settings.host}:{self.settings.admin_port}: {exc.strerror}"
            ) from None

    async def _fetch(self, path: str) -> list[tuple[int, str] | None]:
        """`path` from every worker's operator port: (status, text), None when it did not answer."""

        async def one(http: aiohttp.ClientSession, port: int) -> tuple[int, str] | None:
            try:
                async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                    return response.status, await response.text()
            except (aiohttp.ClientError, TimeoutError):
                return None

        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            return list(
                await asyncio.gather(*(one(http, w.role.admin_port) for w in self._workers))
            )

    async def _metrics(self, _: web.Request) -> web.Response:
        answers = await self._fetch("/metrics")
        texts = {index: answer[1] for index, answer in enumerate(answers) if answer}
        return web.Response(
            body=merge_expositions(texts), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "workers": len(self._workers)})

    async def _readyz(self, _: web.Request) -> web.Response:
        answers = await self._fetch("/readyz")
        not_ready = [
            index for index, answer in enumerate(answers) if not answer or answer[0] != 200
        ]
        if not not_ready:
            return web.json_response({"status": "ready", "workers": len(answers)})
        return web.json_response(
            {"status": "not ready", "reason": f"workers not ready: {not_ready}"}, status=503
        )


class _Families:
    """A collector that hands out families already built."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(texts: Mapping[int, str]) -> bytes:
    """One exposition of every worker's metrics, each sample labelled with its `worker`:
    sums over the label add up, and gauges each worker computes stay its own."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                sample._replace(labels={**sample.labels, "worker": str(index)})
                for sample in family.samples
            )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


def run_workers(settings: Settings, argv: Sequence[str]) -> int:
    """`serve --workers N` until SIGTERM; the exit code."""
    supervisor = Supervisor(settings, argv)
    return asyncio.run(supervisor.run())
