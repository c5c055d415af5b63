"""A real Prometheus scrapes a real bridge under Luma-like traffic; every panel and alert has data.

The bridge runs as `python -m bridge serve` on a Tansu broker of this test's own
(which it freezes with SIGSTOP to cut Kafka off), Prometheus (Debian's package)
scrapes its admin port every second and loads the shipped rules file. The
traffic covers every outcome the metrics can tell apart: simulated generation
lifecycles in all states with Luma's retries, redeliveries, invalid bodies
(dead letters), an unknown state, an unauthorized and a rejected (415) request,
and callbacks sent while Kafka is frozen (503s and produce errors). The reconciler
(`python -m bridge reconcile`, against a fake of Luma's API served by the test) runs
beside it under the same scrape job, so its dashboard row and alerts are checked too.

Then, through Prometheus's HTTP API:

- Dashboard: every target of every panel, with Grafana's variables replaced
  (`$job` by this scrape job, `$instance` by `.*`, `$__rate_interval` by 1m, as
  Grafana computes it for a 15 s scrape interval), is run as a range query over
  the test's time span, as Grafana would draw it. It must return at least one
  finite point: a panel that can show nothing is a bug.
- Recording rules (if any): their expression must return finite data.
- Alerting rules: an alert's expression is a condition, and "no result" is also
  what a healthy system gives, so the full expression only has to be accepted
  by Prometheus. What must return data is the condition's *signal*: the operands
  of its top-level comparisons and `and`/`or`/`unless`, with `absent(x)` read as
  `x` (see `alert_signals`). If a signal is empty, the alert can never fire. All
  rules must also be loaded by Prometheus and evaluate without error.
- The two alerts whose condition this traffic fulfils (dead letters, Kafka
  produce errors) must become active, which shows the rules work on real data.

Without `prometheus` installed this test skips, or fails under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.devtools.embedded import EmbeddedBroker, free_port
from bridge.devtools.fake_luma import FakeLumaAPI
from bridge.devtools.simulate import SimulateOptions, simulate
from tests.ops.support import (
    RULES_PATH,
    alert_rules,
    alert_signals,
    load_dashboard,
    panel_targets,
    require_tool,
    rules,
    substitute,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

JOB = "luma-kafka-bridge"
TOKEN = "e2e-token-0123456789"
LUMA_API_KEY = "e2e-luma-key-0123456789"
GRAFANA_VALUES = {
    "job": JOB,
    "instance": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
}
# Activated by this traffic: its invalid bodies and its Kafka outage.
EXPECTED_ACTIVE_ALERTS = {"LumaBridgeDeadLetters", "LumaBridgeKafkaProduceErrors"}
OUTAGE_SECONDS = 6.0
T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """Ports, files and logs of one run."""

    workdir: Path
    prometheus_bin: str
    callback_port: int
    admin_port: int
    prometheus_port: int
    prometheus_config: Path
    bridge_log: IO[bytes]
    prometheus_log: IO[bytes]
    reconciler_admin_port: int
    reconciler_log: IO[bytes]

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.callback_port}/luma/callback"

    def tail(self, log: IO[bytes], lines: int = 30) -> str:
        log.flush()
        text = Path(log.name).read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class PrometheusAPI:
    """The few calls of Prometheus's HTTP API this test makes."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self.base = base

    async def get(self, path: str, **params: str) -> Any:
        async with self._session.get(f"{self.base}{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        return [{"value": data["result"]}] if data["resultType"] == "scalar" else data["result"]

    async def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = await self.get(
            "/api/v1/query_range", query=expr, start=str(start), end=str(end), step="1"
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None


def has_finite_point(result: list[dict[str, Any]]) -> bool:
    for series in result:
        points = series.get("values") or [series["value"]]
        if any(math.isfinite(float(value)) for _, value in points):
            return True
    return False


async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, *, timeout: float = 30.0
) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.25)


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()


def generation(state: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "state": state,
        "failure_reason": None,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "model": "ray-2",
        "request": {"prompt": "e2e"},
    }


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    prometheus_bin = require_tool("prometheus")
    admin_port = free_port()
    reconciler_admin_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES_PATH)],
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "static_configs": [
                            {
                                "targets": [
                                    f"127.0.0.1:{admin_port}",
                                    f"127.0.0.1:{reconciler_admin_port}",
                                ]
                            }
                        ],
                    }
                ],
            }
        )
    )
    with (
        (tmp_path / "bridge.log").open("wb") as bridge_log,
        (tmp_path / "prometheus.log").open("wb") as prometheus_log,
        (tmp_path / "reconciler.log").open("wb") as reconciler_log,
    ):
        yield Layout(
            workdir=tmp_path,
            prometheus_bin=prometheus_bin,
            callback_port=free_port(),
            admin_port=admin_port,
            prometheus_port=free_port(),
            prometheus_config=config,
            bridge_log=bridge_log,
            prometheus_log=prometheus_log,
            reconciler_admin_port=reconciler_admin_port,
            reconciler_log=reconciler_log,
        )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def answers_200(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@pytest.fixture
async def bridge(
    layout: Layout, own_broker: EmbeddedBroker, http: aiohttp.ClientSession
) -> AsyncIterator[asyncio.subprocess.Process]:
    kafka = ["--kafka-bootstrap-servers", own_broker.bootstrap]
    topics = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "topics", "create", *kafka,
        "--topic-replication-factor", "1", "--topic-partitions", "2",
        stdout=layout.bridge_log, stderr=layout.bridge_log,
    )  # fmt: skip
    assert await asyncio.wait_for(topics.wait(), 60) == 0, layout.tail(layout.bridge_log)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", *kafka,
        "--host", "127.0.0.1",
        "--port", str(layout.callback_port),
        "--admin-port", str(layout.admin_port),
        "--auth-tokens", TOKEN,
        "--kafka-enable-idempotence", "false",
        "--kafka-ack-timeout", "1",
        "--spool-dir", str(layout.workdir / "spool"),
        "--drain-delay", "0",
        "--log-format", "json",
        stdout=layout.bridge_log, stderr=layout.bridge_log,
    )  # fmt: skip
    try:
        readyz = f"http://127.0.0.1:{layout.admin_port}/readyz"

        async def ready() -> bool:
            assert process.returncode is None, layout.tail(layout.bridge_log)
            return await answers_200(http, readyz)

        await eventually(ready, "the bridge to be ready")
        yield process
    finally:
        await stop_process(process)


@pytest.fixture
async def reconciler(
    layout: Layout,
    own_broker: EmbeddedBroker,
    bridge: asyncio.subprocess.Process,
    http: aiohttp.ClientSession,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`reconcile` on the bridge's broker and a fake Luma API; discovery lists every second."""
    async with FakeLumaAPI(api_key=LUMA_API_KEY) as api:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "reconcile",
            "--kafka-bootstrap-servers", own_broker.bootstrap,
            "--kafka-enable-idempotence", "false",
            "--topic-replication-factor", "1",
            "--host", "127.0.0.1",
            "--admin-port", str(layout.reconciler_admin_port),
            "--luma-base-url", api.base_url,
            "--public-url", layout.callback_url,
            "--reconcile-interval-seconds", "1",
            "--log-format", "json",
            env={**os.environ, "LUMA_BRIDGE_LUMA_API_KEY": LUMA_API_KEY},
            stdout=layout.reconciler_log, stderr=layout.reconciler_log,
        )  # fmt: skip
        try:
            readyz = f"http://127.0.0.1:{layout.reconciler_admin_port}/readyz"

            async def ready() -> bool:
                assert process.returncode is None, layout.tail(layout.reconciler_log)
                return await answers_200(http, readyz)

            await eventually(ready, "the reconciler to be ready")
            yield process
        finally:
            await stop_process(process)


@pytest.fixture
async def prometheus(
    layout: Layout,
    bridge: asyncio.subprocess.Process,
    reconciler: asyncio.subprocess.Process,
    http: aiohttp.ClientSession,
) -> AsyncIterator[PrometheusAPI]:
    process = await asyncio.create_subprocess_exec(
        layout.prometheus_bin,
        f"--config.file={layout.prometheus_config}",
        f"--storage.tsdb.path={layout.workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{layout.prometheus_port}",
        "--log.level=warn",
        stdout=layout.prometheus_log,
        stderr=layout.prometheus_log,
    )
    try:
        base = f"http://127.0.0.1:{layout.prometheus_port}"

        async def ready() -> bool:
            assert process.returncode is None, layout.tail(layout.prometheus_log)
            return await answers_200(http, f"{base}/-/ready")

        await eventually(ready, "Prometheus to be ready")
        yield PrometheusAPI(http, base)
    finally:
        await stop_process(process)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any] | bytes,
    *,
    content_type: str = "application/json",
) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": content_type}) as response:
        return response.status


async def bridge_sample(
    session: aiohttp.ClientSession, layout: Layout, name: str, labels: str = ""
) -> float:
    """The sum of the bridge's own `name` samples (with `labels`), from its /metrics now."""
    async with session.get(f"http://127.0.0.1:{layout.admin_port}/metrics") as response:
        text = await response.text()
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    )


def invalid_body() -> dict[str, Any]:
    """A body no dead-letter dedupe has seen: a Generation without its `id`."""
    return {"state": "completed", "note": uuid.uuid4().hex}


async def send_traffic(
    session: aiohttp.ClientSession,
    layout: Layout,
    broker: EmbeddedBroker,
    prometheus: PrometheusAPI,
) -> None:
    """Every kind of callback, each counter rising after Prometheus has seen its series.

    A series born at its first increment has no earlier sample, so `rate()` and
    `increase()` cannot see that increment; a panel or an alert needs a later one.
    """
    url = f"{layout.callback_url}/{TOKEN}"

    async def scraped(name: str, labels: str = "") -> bool:
        """Whether Prometheus holds the bridge's current value of series `name`."""
        value = await bridge_sample(session, layout, name, labels)
        return await prometheus.value(f"sum({name}{{{labels}}})") == value

    # 1. Generation lifecycles in every state, with redeliveries and invalid bodies.
    summary = await simulate(
        SimulateOptions(
            url=url, count=30, concurrency=4, invalid_ratio=0.2, duplicate_ratio=0.3, seed=7
        )
    )
    assert summary.delivered > 0, summary.report()

    # 2. One of each remaining kind.
    unknown = generation("paused")
    assert await post(session, url, unknown) == 200
    assert await post(session, url, unknown) == 200  # the same event again: a duplicate
    assert await post(session, url, invalid_body()) == 400  # a dead letter
    assert await post(session, layout.callback_url, generation("queued")) == 401
    assert await post(session, url, generation("queued"), content_type="text/plain") == 415
    await eventually(
        lambda: scraped("luma_bridge_deadletters_total", 'reason="schema"'),
        "Prometheus to scrape the dead letters",
    )
    assert await post(session, url, invalid_body()) == 400

    # 3. Kafka freezes while callbacks keep coming, until Prometheus sees produce errors
    # rise. Each callback is answered 503 (Luma retries) or 200 from the spool.
    statuses: list[int] = []

    async def produce_errors_rising() -> bool:
        statuses.append(await post(session, url, generation("dreaming")))
        errors = "sum(increase(luma_bridge_kafka_produce_errors_total[1m]))"
        return (await prometheus.value(errors) or 0) > 0

    os.kill(broker.pid, signal.SIGSTOP)
    try:
        await eventually(produce_errors_rising, "produce errors during the outage", timeout=60)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert set(statuses) <= {200, 503}, statuses
    spooled = await bridge_sample(session, layout, "luma_bridge_spooled_total")
    assert 503 in statuses or spooled > 0, "the outage was neither answered 503 nor spooled"

    # 4. Kafka is back: the spool drains and callbacks go straight to Kafka again.
    async def spool_drained() -> bool:
        return (
            await bridge_sample(session, layout, "luma_bridge_spool_drained_total") >= spooled
            and await bridge_sample(session, layout, "luma_bridge_spool_records") == 0
        )

    await eventually(spool_drained, "the spool to drain after the outage", timeout=60)
    summary = await simulate(SimulateOptions(url=url, count=12, concurrency=2, seed=8))
    assert summary.gave_up == 0, summary.report()
    await eventually(
        lambda: scraped("luma_bridge_callbacks_total"), "Prometheus to scrape the last callback"
    )

    # Histogram panels need two samples apart in time: wait until Prometheus sees them grow.
    async def histograms_growing() -> bool:
        for name in (
            "luma_bridge_generation_age_seconds_count",
            "luma_bridge_callback_duration_seconds_count",
            "luma_bridge_kafka_produce_duration_seconds_count",
            "luma_bridge_reconciler_luma_api_duration_seconds_count",
        ):
            if not (await prometheus.value(f"sum(increase({name}[1m]))") or 0) > 0:
                return False
        return True

    await eventually(histograms_growing, "Prometheus to see the histograms grow")


async def test_every_panel_and_alert_has_data(
    layout: Layout,
    own_broker: EmbeddedBroker,
    prometheus: PrometheusAPI,
    http: aiohttp.ClientSession,
) -> None:
    started = time.time()

    async def bridge_is_up() -> bool:
        return await prometheus.value(f'min(up{{job="{JOB}"}})') == 1

    await eventually(bridge_is_up, "Prometheus to scrape the bridge")
    await send_traffic(http, layout, own_broker, prometheus)

    # The rules are loaded and evaluate without error.
    async def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = (await prometheus.get("/api/v1/rules"))["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        return loaded if all(rule["health"] != "unknown" for rule in loaded) else None

    loaded = await eventually(rules_evaluated, "Prometheus to evaluate the rules")
    assert len(loaded) == len(rules())
    assert [(r["name"], r["lastError"]) for r in loaded if r["health"] != "ok"] == []

    # Alerts this traffic must have set off.
    async def expected_alerts_active() -> bool:
        alerts = (await prometheus.get("/api/v1/alerts"))["alerts"]
        return EXPECTED_ACTIVE_ALERTS.issubset(alert["labels"]["alertname"] for alert in alerts)

    await eventually(expected_alerts_active, f"alerts {sorted(EXPECTED_ACTIVE_ALERTS)}")

    empty: list[str] = []
    for rule in (rule for rule in rules() if "record" in rule):
        if not has_finite_point(await prometheus.query(rule["expr"])):
            empty.append(f"recording rule {rule['record']}: {rule['expr']}")
    for rule in alert_rules():
        await prometheus.query(rule["expr"])  # accepted (empty is fine: not firing)
        for signal_expr in alert_signals(rule["expr"]):
            if not has_finite_point(await prometheus.query(signal_expr)):
                empty.append(f"alert {rule['alert']}: {signal_expr}")

    dashboard = load_dashboard()
    targets = [(t, substitute(t.expr, GRAFANA_VALUES)) for t in panel_targets(dashboard)]

    async def panels_without_data() -> list[str]:
        end = time.time()
        return [
            f"{target}: {expr}"
            for target, expr in targets
            if not has_finite_point(await prometheus.query_range(expr, started, end))
        ]

    # The traffic comes in a burst of a few seconds: a rate needs a scrape after it, so
    # the panels are asked again, up to a deadline, until they show it.
    async def all_panels_have_data() -> bool:
        return not await panels_without_data()

    with contextlib.suppress(AssertionError):
        await eventually(all_panels_have_data, "every panel to show data", timeout=20)
    empty.extend(await panels_without_data())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = substitute(variable["definition"], GRAFANA_VALUES)
        found = re.fullmatch(r"label_values\((.+), *(\w+)\)", query)
        assert found, f"variable {variable['name']}: unexpected query {query}"
        values = await prometheus.get(f"/api/v1/label/{found[2]}/values", **{"match[]": found[1]})
        if not values:
            empty.append(f"variable {variable['name']}: {query}")

    assert empty == [], "these expressions return no data:\n" + "\n".join(empty)
