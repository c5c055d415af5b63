"""Failover on a real Apache Kafka cluster: one controller and three brokers (RF 3, min ISR 2).

Each scenario runs the bridge as its own process (the real CLI, idempotent producer on,
acks=all) with its client connections going through a TCP proxy per broker, drives
Luma-shaped load with `simulate` (Luma's retries included), breaks the cluster while the
load runs, repairs it, and audits the lifecycle topic: nothing answered 200 missing, each
generation's states in order, duplicates counted. The numbers go to `FAULT_REPORT` and
the README's fault table. One cluster serves every scenario; each one leaves it whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import free_port
from bridge.ops.logs import REPEAT_WINDOW_SECONDS
from bridge.settings import load_settings
from tests.conftest import kafka_version, unavailable
from tests.faults.harness import (
    OUTAGE,
    BridgeProcess,
    aiokafka_lines,
    audit,
    frozen,
    new_prefix,
    repeated_within_window,
    run_simulate,
    write_report_line,
)
from tests.helpers import consume, topics_visible
from tests.kafka.launcher import KafkaCluster, KafkaLauncherError, KafkaNode, missing_tools

# Broker restarts on a busy 2-core machine take a while: more than the suite's 300 s.
pytestmark = [pytest.mark.faults, pytest.mark.kafka_cluster, pytest.mark.timeout(900)]

STATE_RANK = {"queued": 0, "dreaming": 1, "completed": 2, "failed": 2}
BROKER_IDS = (1, 2, 3)
METADATA_API_KEY = 3
#: One producer asking for metadata every 100 ms, and room for the drainer's lookups.
MAX_METADATA_REQUESTS_PER_SECOND = 30


class BrokerProxies:
    """A TCP proxy in front of each broker's client listener, in a thread of its own.

    Brokers advertise the proxy's port, so every client connection goes through it;
    replication and the controller do not. `cut(node)` makes the broker a black hole
    for clients (connections accepted, nothing answered, as in a network partition);
    `restore(node)` drops those connections so clients reconnect. `requests` counts the
    requests clients send, by API key.
    """

    def __init__(self, node_ids: tuple[int, ...]) -> None:
        self.ports = {node: free_port() for node in node_ids}
        self.targets: dict[int, int] = {}
        self._cut: set[int] = set()
        self.requests: collections.Counter[int] = collections.Counter()
        self._writers: dict[int, set[asyncio.StreamWriter]] = {n: set() for n in node_ids}
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self, targets: dict[int, int]) -> None:
        self.targets = targets
        self._thread.start()
        self._call(self._open()).result(timeout=10)

    def cut(self, node: int) -> None:
        self._call(self._set_cut(node, True)).result(timeout=10)

    def restore(self, node: int) -> None:
        self._call(self._set_cut(node, False)).result(timeout=10)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._close()).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _open(self) -> None:
        for node, port in self.ports.items():
            server = await asyncio.start_server(
                functools.partial(self._connect, node), "127.0.0.1", port
            )
            self._servers.append(server)

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for writers in self._writers.values():
            for writer in writers:
                writer.close()

    async def _set_cut(self, node: int, cut: bool) -> None:
        if cut:
            self._cut.add(node)
        else:
            self._cut.discard(node)
        for writer in list(self._writers[node]):  # both ways: live connections end now
            writer.close()

    async def _connect(
        self, node: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        self._writers[node].add(client_w)
        try:
            if node in self._cut:
                while await client_r.read(65536):  # swallowed: no answer ever comes
                    pass
                return
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.targets[node])
            self._writers[node].add(broker_w)
            await asyncio.gather(
                self._pump(client_r, broker_w, RequestFrames(self.requests)),
                self._pump(broker_r, client_w),
            )
        except OSError:
            pass
        finally:
            for writer in [w for w in self._writers[node] if w is client_w]:
                self._writers[node].discard(writer)
            client_w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: RequestFrames | None = None,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if frames is not None:
                    frames.feed(chunk)
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


class RequestFrames:
    """Counts the Kafka requests in a client's byte stream by API key: each request is a
    4-byte size, then the API key (2 bytes), then the rest of the request."""

    def __init__(self, counts: collections.Counter[int]) -> None:
        self._counts = counts
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        while len(self._pending) >= 6:
            size = int.from_bytes(self._pending[:4], "big")
            if len(self._pending) < 4 + size:
                return
            self._counts[int.from_bytes(self._pending[4:6], "big")] += 1
            del self._pending[: 4 + size]


@dataclass
class Cluster:
    kafka: KafkaCluster
    proxies: BrokerProxies

    @property
    def bootstrap(self) -> str:
        """Through the proxies, as the bridge sees the cluster."""
        return self.kafka.bootstrap

    @property
    def direct(self) -> str:
        """The brokers' own listeners, for the audit's reader and admin calls."""
        return self.kafka.direct_bootstrap


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    missing = missing_tools()
    if missing:
        unavailable(f"the kafka_cluster scenarios need {' and '.join(missing)}")
    proxies = BrokerProxies(BROKER_IDS)
    directory = Path(tempfile.mkdtemp(prefix="luma-kafka-cluster-"))
    try:
        kafka = KafkaCluster.controller_and_brokers(
            directory, kafka_version(), advertised_ports=proxies.ports
        )
    except KafkaLauncherError as exc:
        pytest.fail(f"Apache Kafka cannot be fetched: {exc}")
    proxies.start({node.node_id: node.client_port or 0 for node in kafka.brokers})
    try:
        kafka.start()
    except KafkaLauncherError as exc:
        proxies.stop()
        kafka.kill()  # the log tails are in the message; the directory stays for a look
        pytest.fail(f"the 3-broker cluster did not start: {exc}")
    try:
        yield Cluster(kafka, proxies)
    finally:
        proxies.stop()
        kafka.remove()


@pytest.fixture
async def bridge(
    cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[BridgeProcess]:
    """The bridge on the cluster with production settings: idempotence on, RF 3, min ISR 2
    (a scenario may add settings of its own through `indirect` parametrization)."""
    process = await production_bridge(cluster, tmp_path, **getattr(request, "param", {}))
    process.start()
    try:
        await process.wait_ready(timeout=60)
        yield process
    finally:
        process.stop()
    await fully_replicated(cluster, process.prefix)  # the next scenario starts from a whole cluster


async def production_bridge(
    cluster: Cluster, spool_dir: Path, *, replication: int = 3, **settings: Any
) -> BridgeProcess:
    """A bridge for the whole cluster with production settings (idempotence on) and topics
    of its own (RF 3, min ISR 2, unless told another replication factor), not started yet."""
    await asyncio.to_thread(cluster.kafka.wait_for_brokers, BROKER_IDS)
    prefix = await scenario_topics(cluster, replication)
    return BridgeProcess(
        cluster.bootstrap,
        spool_dir=spool_dir,
        prefix=prefix,
        kafka_enable_idempotence="true",
        **settings,
    )


async def scenario_topics(cluster: Cluster, replication: int = 3, timeout: float = 60.0) -> str:
    """A scenario's own topics, RF `replication` and min ISR 2 at most (read back); their prefix.

    Brokers just restarted may refuse a request for a moment (`NodeNotReadyError`):
    asked again, the same topics, until `timeout`.
    """
    prefix = new_prefix()
    min_isr = min(2, replication)
    settings = load_settings(
        kafka_bootstrap_servers=cluster.direct,
        topic_prefix=prefix,
        topic_partitions=3,
        topic_replication_factor=replication,
        topic_configs={"min.insync.replicas": str(min_isr)},
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            await create_topics(settings)
            await topics_visible(settings)
            layout = await topic_layout(cluster, prefix)
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    assert layout == {(replication, str(min_isr))}
    return prefix


class Load:
    """Luma-shaped load (`simulate`, 100 callbacks/s, Luma's retries) until `stop()`.

    Runs `simulate` in rounds of 300 callbacks, each round new generations, so the load
    lasts as long as the fault does, however long the machine takes to restart brokers.
    """

    ROUND = 300
    RATE = 100.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.summary: dict[str, Any] = {"sent": 0, "statuses": {}}
        self.acked: list[str] = []
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        seed = 100
        while not self._stopping.is_set():
            summary, acked = await run_simulate(self.url, self.ROUND, rate=self.RATE, seed=seed)
            seed += 1
            self.summary["sent"] += summary["sent"]
            for status, count in summary["statuses"].items():
                self.summary["statuses"][status] = self.summary["statuses"].get(status, 0) + count
            self.acked += acked

    async def stop(self) -> tuple[dict[str, Any], list[str]]:
        """Let the running round finish; what was sent and acknowledged."""
        self._stopping.set()
        await self._task
        return self.summary, self.acked


async def partitions(cluster: Cluster, prefix: str) -> list[dict[str, Any]]:
    """Every partition of the scenario's topics: topic, partition, leader, replicas, isr."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.direct, request_timeout_ms=5000)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return [{"topic": t["topic"], **p} for t in described for p in t["partitions"]]


async def topic_layout(
    cluster: Cluster, prefix: str, timeout: float = 30.0
) -> set[tuple[int, str]]:
    """(replicas, min.insync.replicas) of every partition of the scenario's topics.

    A broker that has not yet applied the topics' creation answers their configs with an
    error and no entries: asked again until every topic has its value, within `timeout`.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.direct, request_timeout_ms=5000)
    await admin.start()
    deadline = time.monotonic() + timeout
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
        described = await admin.describe_topics(topics)
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        while True:
            min_isr = min_insync_replicas(await admin.describe_configs(resources))
            if len(min_isr) == len(topics):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"min.insync.replicas of {topics} not known in {timeout}s")
            await asyncio.sleep(0.25)
    finally:
        await admin.close()
    return {(len(p["replicas"]), min_isr[t["topic"]]) for t in described for p in t["partitions"]}


def min_insync_replicas(responses: list[Any]) -> dict[str, str]:
    """Topic name to its min.insync.replicas, for the topics a DescribeConfigs answered."""
    return {
        resource[3]: entry[1]
        for response in responses
        for resource in response.resources
        for entry in resource[4]
        if entry[0] == "min.insync.replicas"
    }


async def fully_replicated(cluster: Cluster, prefix: str, timeout: float = 120.0) -> float:
    """Wait until every partition has a leader and all its replicas in sync; seconds it took."""
    return await partitions_until(
        cluster, prefix, lambda found: all(whole(p) for p in found), "ISR not whole", timeout
    )


async def partitions_until(
    cluster: Cluster,
    prefix: str,
    condition: Callable[[list[dict[str, Any]]], bool],
    failure: str,
    timeout: float,
) -> float:
    """Ask for the partitions of `prefix` until `condition` holds; seconds it took. A broker
    on its way up or down may not answer: asked again."""
    started = time.monotonic()
    found: list[dict[str, Any]] | None = None  # the last answer, for the failure
    while True:
        with contextlib.suppress(KafkaError):
            found = await partitions(cluster, prefix)
            if condition(found):
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{failure} after {timeout}s: {found}")
        await asyncio.sleep(0.25)


def whole(partition: dict[str, Any]) -> bool:
    """A leader, and every replica in sync. (A partition whose replicas are all down keeps
    its last in-sync replica listed: the leader tells it is offline.)"""
    return bool(partition["leader"] >= 0 and len(partition["isr"]) == len(partition["replicas"]))


async def offline_partition(cluster: Cluster, prefix: str, timeout: float = 60.0) -> None:
    """Wait until the brokers that are up report a partition of `prefix` without a leader."""
    await partitions_until(
        cluster,
        prefix,
        lambda found: any(p["leader"] < 0 for p in found),
        f"no partition of {prefix} offline",
        timeout,
    )


async def lifecycle_leader(cluster: Cluster, prefix: str) -> int:
    found = [p for p in await partitions(cluster, prefix) if p["topic"] == f"{prefix}.lifecycle"]
    return int(found[0]["leader"])


async def answered(bridge: BridgeProcess) -> float:
    """Callbacks the bridge has answered so far, whatever the outcome."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{bridge.admin_port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("luma_bridge_callbacks_total{")
    )


async def load_established(bridge: BridgeProcess, at_least: int = 150) -> None:
    deadline = time.monotonic() + 60
    while await answered(bridge) < at_least:
        assert time.monotonic() < deadline, f"load did not reach {at_least}: {bridge.log_text()}"
        await asyncio.sleep(0.1)


async def spool_drained(bridge: BridgeProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while await bridge.metric("luma_bridge_spool_records") > 0:
        assert time.monotonic() < deadline, (
            f"spool not drained in {timeout}s; the bridge's log ends: {bridge.log_text()}"
        )
        await asyncio.sleep(0.1)


def recovery(cluster: Cluster, bridge: BridgeProcess) -> asyncio.Task[float]:
    """Started at the repair: seconds until every partition has its three in-sync replicas
    again and the bridge's spool is empty (measured while the load goes on)."""

    async def measure(repaired_at: float) -> float:
        await fully_replicated(cluster, bridge.prefix)
        await spool_drained(bridge)
        return time.monotonic() - repaired_at

    return asyncio.create_task(measure(time.monotonic()))


async def check_restarted(
    scenario: str, cluster: Cluster, bridge: BridgeProcess, load: Load
) -> dict[str, Any]:
    """Called once the brokers that were down are started again: `check`, once every
    broker is up, and every callback answered 200 (spooled, never refused)."""
    repaired = recovery(cluster, bridge)
    await asyncio.to_thread(cluster.kafka.wait_for_brokers, BROKER_IDS)
    numbers = await check(scenario, cluster, bridge, load, recovery=repaired)
    assert set(numbers["statuses"]) == {"200"}, numbers
    return numbers


def order_violations(records: list[ConsumerRecord]) -> int:
    """Generations whose states, in the order first written, go backwards in the lifecycle.

    A small function of its own so a shared audit can replace it. Duplicates of a state
    already seen are left to the duplicate count.
    """
    seen: dict[bytes, list[str]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        state = dict(record.headers)["luma-state"].decode()
        states = seen.setdefault(record.key or b"", [])
        if state not in states:
            states.append(state)
    return sum(
        1
        for states in seen.values()
        if [STATE_RANK[s] for s in states] != sorted(STATE_RANK[s] for s in states)
    )


async def check(
    scenario: str,
    cluster: Cluster,
    bridge: BridgeProcess,
    load: Load,
    *,
    recovery: asyncio.Task[float],
) -> dict[str, Any]:
    """Wait for the load and the spool, then audit the lifecycle topic; the numbers."""
    recovered = await recovery  # the load goes on meanwhile
    summary, acked = await load.stop()
    await spool_drained(bridge)
    expect = set(acked)
    records = await consume(
        cluster.direct,
        f"{bridge.prefix}.lifecycle",
        done=lambda rs, idle: (
            idle and expect <= {dict(r.headers)["luma-event-id"].decode() for r in rs}
        ),
        timeout=90,
    )
    found = [dict(r.headers)["luma-event-id"].decode() for r in records]
    result = audit(scenario, summary, acked, found)
    numbers = {
        **result.as_dict(),
        "order_violations": order_violations(records),
        "recover_s": round(recovered, 1),
        "kafka": cluster.kafka.version,
    }
    write_report_line({**numbers, "scenario": f"{scenario} (full audit)"})
    assert result.missing == 0, numbers
    assert numbers["order_violations"] == 0, numbers
    assert result.acknowledged > 0, numbers
    return numbers


async def test_partition_leader_sigkilled_and_restarted(
    cluster: Cluster, bridge: BridgeProcess
) -> None:
    load = Load(bridge.url)
    await load_established(bridge)
    leader = cluster.kafka.broker(await lifecycle_leader(cluster, bridge.prefix))
    leader.kill()
    survivors = [n for n in BROKER_IDS if n != leader.node_id]
    # Fenced by the controller after broker.session.timeout.ms: leadership moves.
    await asyncio.to_thread(cluster.kafka.wait_for_brokers, survivors, 60)
    assert await lifecycle_leader(cluster, bridge.prefix) != leader.node_id
    await asyncio.sleep(OUTAGE)  # the outage: the broker stays dead this long
    leader.start()
    repaired = recovery(cluster, bridge)
    await asyncio.to_thread(cluster.kafka.wait_for_brokers, BROKER_IDS)
    await check(
        "Kafka: partition leader SIGKILLed, restarted", cluster, bridge, load, recovery=repaired
    )


async def test_rolling_restart_of_all_three_brokers(
    cluster: Cluster, bridge: BridgeProcess
) -> None:
    load = Load(bridge.url)
    await load_established(bridge)
    for node_id in BROKER_IDS:  # as Strimzi does: one at a time, the next once ISR is whole
        node = cluster.kafka.broker(node_id)
        await asyncio.to_thread(node.stop)
        node.start()
        await asyncio.to_thread(cluster.kafka.wait_for_brokers, BROKER_IDS)
        await fully_replicated(cluster, bridge.prefix)
    repaired = recovery(cluster, bridge)
    await check("Kafka: rolling restart of 3 brokers", cluster, bridge, load, recovery=repaired)


async def test_two_brokers_down_spools_then_drains_in_order(
    cluster: Cluster, bridge: BridgeProcess
) -> None:
    load = Load(bridge.url)
    await load_established(bridge)
    down = [cluster.kafka.broker(2), cluster.kafka.broker(3)]
    for node in down:
        node.kill()
    # One replica left, min.insync.replicas=2: acks=all writes get NotEnoughReplicas.
    await asyncio.to_thread(cluster.kafka.wait_for_brokers, [1], 60)
    await bridge.wait_for_metric("luma_bridge_spool_records", 100, timeout=60)
    await asyncio.sleep(OUTAGE)
    for node in down:
        node.start()
    await check_restarted("Kafka: 2 of 3 brokers down (NotEnoughReplicas)", cluster, bridge, load)


async def test_whole_cluster_stopped_and_started_with_its_data(
    cluster: Cluster, bridge: BridgeProcess
) -> None:
    load = Load(bridge.url)
    await load_established(bridge, at_least=300)
    await asyncio.to_thread(cluster.kafka.stop)  # brokers, then the controller
    await bridge.wait_for_metric("luma_bridge_spool_records", 100, timeout=60)
    await asyncio.sleep(OUTAGE)
    for node in cluster.kafka.nodes:  # the same data directories: nothing formatted anew
        node.start()
    await check_restarted("Kafka: whole cluster stopped and started", cluster, bridge, load)
    # While no broker listened, aiokafka's client retried without pause (65,000 ERROR
    # lines in one run of this scenario): each kind is let through once per window.
    lines = aiokafka_lines(Path(bridge.log.name))
    assert repeated_within_window(lines, REPEAT_WINDOW_SECONDS) == {}


async def test_one_broker_cut_off_from_the_bridge(cluster: Cluster, bridge: BridgeProcess) -> None:
    load = Load(bridge.url)
    await load_established(bridge)
    # The leader stays in the cluster (replication and controller untouched) and stays
    # leader: only the bridge cannot reach it, so its partitions must time out to the spool.
    leader = await lifecycle_leader(cluster, bridge.prefix)
    cluster.proxies.cut(leader)
    try:
        await bridge.wait_for_metric("luma_bridge_spool_records", 20, timeout=60)
        await asyncio.sleep(OUTAGE)
    finally:
        cluster.proxies.restore(leader)
    repaired = recovery(cluster, bridge)
    await check("Kafka: one broker cut off by a proxy", cluster, bridge, load, recovery=repaired)


@pytest.mark.parametrize("bridge", [{"replication": 1}], indirect=True)
async def test_a_partition_without_a_leader_is_asked_about_at_a_paced_rate(
    cluster: Cluster, bridge: BridgeProcess
) -> None:
    """Every replica of a partition down, the other brokers up (RF 1 and one broker here;
    RF 3 and the three brokers that hold a partition in a larger cluster): the partition
    is offline, and records for it wait for a leader. The brokers that are up answer
    metadata requests at once, that the partition has none. The bridge asks again at a
    paced rate, not as soon as each answer comes, as aiokafka's sender does on its own."""
    load = Load(bridge.url)
    await load_established(bridge)
    victim = cluster.kafka.broker(await lifecycle_leader(cluster, bridge.prefix))
    victim.kill()
    try:
        await offline_partition(cluster, bridge.prefix)
        await bridge.wait_for_metric("luma_bridge_spool_records", 20, timeout=60)
        asked = cluster.proxies.requests[METADATA_API_KEY]
        started = time.monotonic()
        await asyncio.sleep(max(OUTAGE, 5.0))  # an observation window, not a wait
        rate = (cluster.proxies.requests[METADATA_API_KEY] - asked) / (time.monotonic() - started)
    finally:
        victim.start()
    await check_restarted(
        "Kafka: a partition without a leader (RF 1, its broker killed)", cluster, bridge, load
    )
    assert rate <= MAX_METADATA_REQUESTS_PER_SECOND, f"{rate:.0f} metadata requests a second"


def processes(nodes: Iterable[KafkaNode]) -> list[subprocess.Popen[bytes]]:
    """The processes of these nodes that run (to freeze them)."""
    return [node.process for node in nodes if node.process is not None]


@pytest.mark.parametrize("bridge", [{"kafka_request_timeout_ms": 2000}], indirect=True)
async def test_whole_cluster_frozen_past_the_request_timeout_makes_no_duplicates(
    cluster: Cluster, bridge: BridgeProcess
) -> None:
    """The production default (idempotent producer) through an outage that outlasts the
    producer's request timeout: requests in flight are appended when the brokers resume
    and retried with their sequence numbers, so the brokers drop the copies: exactly 0."""
    load = Load(bridge.url)
    await load_established(bridge)
    with frozen(*processes(cluster.kafka.nodes)):  # the controller too
        await bridge.wait_for_metric("luma_bridge_spool_records", 20, timeout=60)
        await asyncio.sleep(max(OUTAGE, 5.0))
    repaired = recovery(cluster, bridge)
    numbers = await check(
        "Kafka: whole cluster frozen past the request timeout",
        cluster,
        bridge,
        load,
        recovery=repaired,
    )
    assert numbers["duplicates"] == 0, numbers


async def test_a_bridge_started_while_the_controller_is_away_spools_then_delivers(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Brokers just started hold no producer ids: each asks the controller for a block.
    While the controller is away, an idempotent producer's start() waits for an id, for
    as long as it takes and without a word (aiokafka). The bridge gives that start up
    after the request timeout: it answers callbacks from its spool, and delivers them
    once the controller is back. (A renewal after a whole-cluster restart once waited
    there for good: the spool never drained.)"""
    for node in cluster.kafka.brokers:  # fresh brokers: no producer id block in hand
        await asyncio.to_thread(node.stop)
        node.start()
    bridge = await production_bridge(cluster, tmp_path, kafka_request_timeout_ms=2000)
    try:
        with frozen(*processes(node for node in cluster.kafka.nodes if not node.is_broker)):
            bridge.start()
            await bridge.wait_ready(timeout=60)
            load = Load(bridge.url)
            await bridge.wait_for_metric("luma_bridge_spool_records", 100, timeout=60)
            await asyncio.sleep(OUTAGE)
        repaired = recovery(cluster, bridge)
        numbers = await check(
            "Kafka: bridge started while the controller is away",
            cluster,
            bridge,
            load,
            recovery=repaired,
        )
    finally:
        bridge.stop()
    assert set(numbers["statuses"]) == {"200"}, numbers
    await fully_replicated(cluster, bridge.prefix)


def test_the_order_audit_counts_a_generation_that_goes_backwards() -> None:
    def record(offset: int, key: bytes, state: str) -> ConsumerRecord:
        headers = [("luma-state", state.encode()), ("luma-event-id", f"{key!r}{state}".encode())]
        return cast(
            ConsumerRecord,
            SimpleNamespace(partition=0, offset=offset, key=key, headers=headers),
        )

    in_order = [
        record(0, b"a", "queued"),
        record(1, b"a", "dreaming"),
        record(2, b"a", "completed"),
    ]
    assert order_violations(in_order) == 0
    duplicate = [*in_order, record(3, b"a", "queued")]  # a redelivery: counted as a duplicate
    assert order_violations(duplicate) == 0
    backwards = [record(0, b"b", "dreaming"), record(1, b"b", "queued"), *in_order]
    assert order_violations(backwards) == 1
