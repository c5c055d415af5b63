"""Apache Kafka itself for the test suite: jars from Maven Central, KRaft brokers as `java`.

`ensure_jars` fetches one pinned Kafka release (and a logging backend) with Maven into
`~/.cache/luma-kafka-bridge/kafka-<version>/jars` once; later runs reuse it. A
`KafkaCluster` formats KRaft storage with Kafka's own `StorageTool` and runs each node as
`java -cp 'jars/*' kafka.Kafka server.properties`, with its data on disk (so a node can be
SIGKILLed and restarted with its log intact) and its output in a log file that
`describe_failure` prints. Two shapes: `combined` (one controller+broker process, with an
optional SASL/SCRAM-over-TLS listener) and `controller_and_brokers` (one controller-only
process and N broker-only processes, so the quorum survives brokers going down).
Start-up waits until the cluster's metadata lists every broker, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.devtools.embedded import free_port

# Pinned releases (what Maven Central served when they were measured): the current 4.x and
# the last 3.x line, which many clusters still run. `LUMA_TEST_KAFKA_VERSION` picks one.
KAFKA_VERSIONS = {"4": "4.4.0", "3.9": "3.9.2"}
DEFAULT_KAFKA_VERSION = KAFKA_VERSIONS["4"]

POM = Path(__file__).with_name("pom.xml")
LOG4J_PROPERTIES = Path(__file__).with_name("log4j.properties")

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_USER = "luma-bridge"
SCRAM_PASSWORD = "scram-test-password-1234"  # a throwaway broker's test user

# A broker in a test needs little: Kafka's scripts default to 1 GiB, four of them at once
# on a 2-core, 24 GiB machine shared with other suites would be wasteful.
BROKER_HEAP = "-Xmx512m"
CONTROLLER_HEAP = "-Xmx256m"


class KafkaLauncherError(RuntimeError):
    """Kafka cannot be fetched or started here; the message says what is missing."""


def resolve_version(requested: str | None) -> str:
    """`4` / `3.9` name the pinned releases; a full version (e.g. `3.9.1`) is taken as is."""
    if not requested:
        return DEFAULT_KAFKA_VERSION
    return KAFKA_VERSIONS.get(requested, requested)


def cache_root() -> Path:
    configured = os.environ.get("LUMA_KAFKA_CACHE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "luma-kafka-bridge"


def missing_tools() -> list[str]:
    """`java` and `mvn`, each when not on PATH."""
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def ensure_jars(version: str, *, progress: Callable[[str], None] | None = None) -> Path:
    """The directory of Kafka `version`'s jars, fetched with Maven the first time.

    Raises `KafkaLauncherError` when java or Maven is missing or the fetch fails.
    """
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    jars = cache_root() / f"kafka-{version}" / "jars"
    if (jars / ".complete").is_file():
        return jars
    missing = missing_tools()
    if missing:
        raise KafkaLauncherError(
            f"{' and '.join(missing)} not found: install a JDK and Maven "
            "(`apt-get install default-jdk-headless maven`, or run scripts/bootstrap)"
        )
    jars.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="jars-", dir=jars.parent))
    say(
        f"fetching Apache Kafka {version} from Maven Central into {jars} "
        "(first time only; about a minute)"
    )
    started = time.monotonic()
    argv = [
        "mvn",
        "-B",
        "-f",
        str(POM),
        f"-Dkafka.version={version}",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    returncode, tail = run_with_progress(argv, say)
    if returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaLauncherError(
            f"fetching Kafka {version} with Maven failed (exit {returncode}): {tail}"
        )
    (staging / ".complete").touch()
    if jars.exists():  # another run finished first; theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(jars)
    count = len(list(jars.glob("*.jar")))
    say(f"fetched {count} jars for Kafka {version} in {time.monotonic() - started:.0f}s")
    return jars


def run_with_progress(argv: list[str], say: Callable[[str], None]) -> tuple[int, str]:
    """Run Maven, saying every 10 files downloaded; its exit code and its last lines."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    downloaded = 0
    last: list[str] = []
    for line in process.stdout:
        last = [*last[-40:], line.rstrip()]
        if line.startswith("Downloaded from"):
            downloaded += 1
            if downloaded % 10 == 0:
                say(f"  ... {downloaded} files downloaded")
    return process.wait(), "\n".join(last)


def java_command(jars: Path, main_class: str, *args: str, heap: str = BROKER_HEAP) -> list[str]:
    return [
        "java",
        heap,
        # kafka-run-class.sh's KAFKA_JVM_PERFORMANCE_OPTS: short collector pauses, as
        # brokers run in production (the JVM's default pause target is 200 ms).
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:-UsePerfData",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{LOG4J_PROPERTIES}",
        "-cp",
        f"{jars}/*",
        main_class,
        *args,
    ]


def properties_text(values: dict[str, Any]) -> str:
    return "".join(f"{key}={value}\n" for key, value in values.items())


@dataclass(eq=False)
class KafkaNode:
    """One `kafka.Kafka` process: its ports, its data directory and its log file."""

    node_id: int
    roles: str  # "broker,controller", "controller" or "broker"
    directory: Path
    jars: Path
    properties: dict[str, Any] = field(default_factory=dict)
    client_port: int | None = None  # the PLAINTEXT listener clients use (brokers only)
    advertised_port: int | None = None  # what clients are told: a proxy's port, or client_port
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.directory / "kafka.log"

    @property
    def is_broker(self) -> bool:
        return "broker" in self.roles

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self) -> None:
        self.config_file.write_text(properties_text(self.properties))

    def start(self) -> None:
        """Start the process (its storage must be formatted); returns at once."""
        if self.running:
            return
        heap = BROKER_HEAP if self.is_broker else CONTROLLER_HEAP
        argv = java_command(self.jars, "kafka.Kafka", str(self.config_file), heap=heap)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _LIVE.add(self)

    def kill(self) -> None:
        """SIGKILL: the node dies without flushing or leaving the cluster."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        _LIVE.discard(self)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait for a controlled shutdown (leadership moved away first)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        _LIVE.discard(self)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


# Every node still running, killed at interpreter exit should a fixture's teardown not run.
_LIVE: set[KafkaNode] = set()


@atexit.register
def _kill_leftovers() -> None:
    for node in list(_LIVE):
        node.kill()


@dataclass
class Secure:
    """A SASL_SSL listener with a SCRAM user and a certificate signed by a test CA."""

    port: int
    ca_file: Path
    keystore_file: Path
    user: str = SCRAM_USER
    password: str = SCRAM_PASSWORD
    mechanism: str = SCRAM_MECHANISM


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A test CA (PEM) and a broker keystore (PEM: PKCS#8 key + chain) for 127.0.0.1."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    # Kafka's PEM keystore reads PKCS#8 keys only ("BEGIN PRIVATE KEY").
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    keystore = directory / "broker-keystore.pem"
    keystore.write_bytes(pkcs8 + b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca_file, keystore


class KafkaCluster:
    """A KRaft cluster of `KafkaNode`s under one directory. Use `with` or start()/stop()."""

    def __init__(self, directory: Path, version: str, nodes: list[KafkaNode]) -> None:
        self.directory = directory
        self.version = version
        self.nodes = nodes
        self.secure: Secure | None = None

    # -- shapes ---------------------------------------------------------------------------

    @classmethod
    def combined(
        cls, directory: Path, version: str = DEFAULT_KAFKA_VERSION, *, secure: bool = False
    ) -> KafkaCluster:
        """One process that is controller and broker: the integration suite's broker."""
        jars = ensure_jars(version)
        controller_port, client_port = free_port(), free_port()
        node = KafkaNode(
            1, "broker,controller", directory / "node-1", jars, client_port=client_port
        )
        node.advertised_port = client_port
        listeners = {"CLIENT": client_port, "CONTROLLER": controller_port}
        protocols = {"CLIENT": "PLAINTEXT", "CONTROLLER": "PLAINTEXT"}
        cluster = cls(directory, version, [node])
        extra: dict[str, Any] = {}
        if secure:
            directory.mkdir(parents=True, exist_ok=True)
            ca_file, keystore = make_certificates(directory)
            cluster.secure = Secure(free_port(), ca_file, keystore)
            listeners["SECURE"] = cluster.secure.port
            protocols["SECURE"] = "SASL_SSL"
            extra = cluster.secure_listener_properties()
        node.properties = {
            **common_properties(replication=1),
            "node.id": 1,
            "process.roles": "broker,controller",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "CLIENT",
            "listeners": ",".join(f"{n}://127.0.0.1:{p}" for n, p in listeners.items()),
            "advertised.listeners": ",".join(
                f"{n}://127.0.0.1:{p}" for n, p in listeners.items() if n != "CONTROLLER"
            ),
            "listener.security.protocol.map": ",".join(f"{n}:{p}" for n, p in protocols.items()),
            "log.dirs": node.directory / "data",
            **extra,
        }
        return cluster

    @classmethod
    def controller_and_brokers(
        cls,
        directory: Path,
        version: str = DEFAULT_KAFKA_VERSION,
        *,
        brokers: int = 3,
        advertised_ports: dict[int, int] | None = None,
    ) -> KafkaCluster:
        """One controller-only process and `brokers` broker-only ones (RF 3, min ISR 2).

        With a separate controller the quorum survives any number of brokers going down,
        so two brokers down means `NotEnoughReplicas`, not a lost quorum. Each broker's
        client listener is advertised on `advertised_ports[node_id]` when given (a proxy in
        front of it), else on its own port; brokers replicate over a separate listener.
        """
        jars = ensure_jars(version)
        controller_port = free_port()
        voters = f"0@127.0.0.1:{controller_port}"
        controller = KafkaNode(0, "controller", directory / "node-0", jars)
        controller.properties = {
            **common_properties(replication=brokers),
            "node.id": 0,
            "process.roles": "controller",
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "listeners": f"CONTROLLER://127.0.0.1:{controller_port}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT",
            "log.dirs": controller.directory / "data",
        }
        nodes = [controller]
        for node_id in range(1, brokers + 1):
            client_port, internal_port = free_port(), free_port()
            advertised = (advertised_ports or {}).get(node_id, client_port)
            node = KafkaNode(
                node_id,
                "broker",
                directory / f"node-{node_id}",
                jars,
                client_port=client_port,
                advertised_port=advertised,
            )
            node.properties = {
                **common_properties(replication=brokers),
                "node.id": node_id,
                "process.roles": "broker",
                "controller.quorum.voters": voters,
                "controller.listener.names": "CONTROLLER",
                "inter.broker.listener.name": "INTERNAL",
                "listeners": f"CLIENT://127.0.0.1:{client_port},"
                f"INTERNAL://127.0.0.1:{internal_port}",
                "advertised.listeners": f"CLIENT://127.0.0.1:{advertised},"
                f"INTERNAL://127.0.0.1:{internal_port}",
                "listener.security.protocol.map": "CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,"
                "CONTROLLER:PLAINTEXT",
                "log.dirs": node.directory / "data",
            }
            nodes.append(node)
        return cls(directory, version, nodes)

    def secure_listener_properties(self) -> dict[str, Any]:
        assert self.secure is not None
        mechanism = self.secure.mechanism.lower()
        return {
            "sasl.enabled.mechanisms": self.secure.mechanism,
            f"listener.name.secure.{mechanism}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "listener.name.secure.ssl.keystore.type": "PEM",
            "listener.name.secure.ssl.keystore.location": self.secure.keystore_file,
        }

    # -- life cycle -------------------------------------------------------------------------

    @property
    def brokers(self) -> list[KafkaNode]:
        return [node for node in self.nodes if node.is_broker]

    @property
    def bootstrap(self) -> str:
        """The client listeners as clients are told about them (proxies included)."""
        return ",".join(f"127.0.0.1:{node.advertised_port}" for node in self.brokers)

    @property
    def direct_bootstrap(self) -> str:
        """The brokers' own client listeners, bypassing any proxy."""
        return ",".join(f"127.0.0.1:{node.client_port}" for node in self.brokers)

    def broker(self, node_id: int) -> KafkaNode:
        return next(node for node in self.brokers if node.node_id == node_id)

    def format(self) -> None:
        """Write each node's config and format its KRaft storage with one cluster id."""
        jars = self.nodes[0].jars
        cluster_id = run_tool(jars, "kafka.tools.StorageTool", "random-uuid").strip()
        scram: list[str] = []
        if self.secure is not None:
            scram = [
                "--add-scram",
                f"{self.secure.mechanism}=[name={self.secure.user},"
                f"password={self.secure.password}]",
            ]
        formats = []
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.write_config()
            argv = ["format", "-t", cluster_id, "-c", str(node.config_file), *scram]
            formats.append(start_tool(jars, "kafka.tools.StorageTool", *argv))
        for process in formats:  # one JVM each; started together, they overlap
            finish_tool(process, "StorageTool format")

    def start(self, timeout: float = 120.0) -> KafkaCluster:
        """Format (once), start every node and wait until metadata lists every broker."""
        if not any(node.config_file.exists() for node in self.nodes):
            self.format()
        for node in self.nodes:
            node.start()
        self.wait_for_brokers([node.node_id for node in self.brokers], timeout=timeout)
        return self

    def stop(self) -> None:
        """Brokers first, the controller last, each with a controlled shutdown."""
        for node in sorted(self.nodes, key=lambda n: not n.is_broker):
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def remove(self) -> None:
        """Kill every node and delete the data directories and logs."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def wait_for_brokers(self, node_ids: Iterable[int], timeout: float = 120.0) -> None:
        """Block until the cluster metadata lists exactly these brokers as alive."""
        wanted = set(node_ids)
        deadline = time.monotonic() + timeout
        last: set[int] | str = "no answer yet"
        while time.monotonic() < deadline:
            dead = [node for node in self.nodes if node.process is not None and not node.running]
            if dead:
                raise KafkaLauncherError(
                    f"Kafka node {dead[0].node_id} exited: {self.describe_failure()}"
                )
            bootstrap = self.direct_bootstrap_of(wanted)
            last = asyncio.run(live_brokers(bootstrap)) if accepts(bootstrap) else "not listening"
            if last == wanted:
                return
            time.sleep(0.2)
        raise KafkaLauncherError(
            f"brokers {sorted(wanted)} not all in the metadata after {timeout}s "
            f"(saw {last}): {self.describe_failure()}"
        )

    def direct_bootstrap_of(self, node_ids: set[int]) -> str:
        ports = [n.client_port for n in self.brokers if n.node_id in node_ids and n.running]
        return ",".join(f"127.0.0.1:{port}" for port in ports)

    def describe_failure(self) -> str:
        """Each node's log tail, for the failure message of a test or fixture."""
        return "\n".join(
            f"--- node {node.node_id} ({node.roles}), log {node.log_file}:\n{node.log_tail()}"
            for node in self.nodes
        )


async def live_brokers(bootstrap: str) -> set[int] | str:
    """The broker ids a metadata request reports, or why there is no answer."""
    from aiokafka.admin import AIOKafkaAdminClient

    if not bootstrap:
        return "no broker running"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return {int(broker["node_id"]) for broker in cluster["brokers"]}
    except Exception as exc:
        return type(exc).__name__
    finally:
        await admin.close()


def accepts(bootstrap: str) -> bool:
    """Whether the first of these host:port pairs takes TCP connections now."""
    if not bootstrap:
        return False
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def run_tool(jars: Path, main_class: str, *args: str) -> str:
    """Run one of Kafka's command-line tools; its output, or `KafkaLauncherError`."""
    return finish_tool(start_tool(jars, main_class, *args), f"{main_class} {args[0]}")


def start_tool(jars: Path, main_class: str, *args: str) -> subprocess.Popen[str]:
    argv = java_command(jars, main_class, *args, heap="-Xmx256m")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_tool(process: subprocess.Popen[str], what: str) -> str:
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    if process.returncode != 0:
        raise KafkaLauncherError(
            f"Kafka's {what} failed (exit {process.returncode}): {output.strip()[-2000:]}"
        )
    return output


def common_properties(*, replication: int) -> dict[str, Any]:
    """Settings shared by every node: internal topics sized to the cluster, quick tests."""
    return {
        "num.partitions": 1,
        "default.replication.factor": replication,
        "min.insync.replicas": min(2, replication),
        "offsets.topic.replication.factor": replication,
        "offsets.topic.num.partitions": 3,
        "transaction.state.log.replication.factor": replication,
        "transaction.state.log.min.isr": min(2, replication),
        "transaction.state.log.num.partitions": 3,
        "share.coordinator.state.topic.replication.factor": replication,
        "share.coordinator.state.topic.min.isr": min(2, replication),
        "group.initial.rebalance.delay.ms": 0,
        # A broker that stops heartbeating is fenced after 3 s, not 9: quick failover.
        "broker.session.timeout.ms": 3000,
        "broker.heartbeat.interval.ms": 500,
        "num.network.threads": 2,
        "num.io.threads": 4,
        "num.recovery.threads.per.data.dir": 1,
        "auto.create.topics.enable": "false",
        "unclean.leader.election.enable": "false",
    }


def main() -> None:
    """`python -m tests.kafka.launcher`: fetch every pinned version's jars (scripts/bootstrap)."""
    for version in KAFKA_VERSIONS.values():
        print(f"Kafka {version}: {ensure_jars(version)}", flush=True)


if __name__ == "__main__":
    main()
