"""Shared fixtures: a real Kafka-protocol broker, chosen by one switch as the README says.

`LUMA_TEST_BROKER` lists the brokers the integration suite runs against, comma-separated:
- `apache`: Apache Kafka itself (`LUMA_TEST_KAFKA_VERSION`, default the pinned 4.x), one
  KRaft process started from Maven Central's jars by tests/kafka/launcher.py (a JDK and
  Maven needed), or testcontainers' Kafka when java is missing and a Docker engine
  answers;
- `tansu`: the embedded Tansu broker (memory only, no idempotent producer);
- `external`: the cluster at `KAFKA_BOOTSTRAP_SERVERS`.
Unset, it is `tansu,apache` (both, as CI runs), or `external` when
`KAFKA_BOOTSTRAP_SERVERS` is set. Every test that takes `kafka_broker` runs once per
broker. Under CI=true a missing broker fails the tests that need it instead of skipping.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError
from tests.kafka.launcher import (
    KafkaCluster,
    KafkaLauncherError,
    Secure,
    missing_tools,
    resolve_version,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BROKER_KINDS = ("apache", "tansu", "external")


def unavailable(reason: str) -> NoReturn:
    """Skip locally, fail in CI: a test that needs a component must not pass without it."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required components must be present)")
    pytest.skip(reason)


def chosen_brokers() -> list[str]:
    """The kinds named by `LUMA_TEST_BROKER` (see the module docstring)."""
    configured = os.environ.get("LUMA_TEST_BROKER", "")
    if not configured:
        return ["external"] if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else ["tansu", "apache"]
    kinds = [kind.strip() for kind in configured.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in BROKER_KINDS]
    if unknown:
        raise pytest.UsageError(
            f"LUMA_TEST_BROKER={configured}: unknown {unknown}; use {', '.join(BROKER_KINDS)}"
        )
    return kinds


def kafka_version() -> str:
    return resolve_version(os.environ.get("LUMA_TEST_KAFKA_VERSION"))


@dataclass(frozen=True)
class KafkaBroker:
    """A running broker: where it is, and whether it has the idempotent producer."""

    bootstrap: str
    supports_idempotence: bool
    kind: str
    version: str | None = None
    secure: Secure | None = None  # a SASL_SSL listener with a SCRAM user, when it has one


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
    except Exception:
        return False
    return True


def start_apache_kafka(version: str, *, secure: bool) -> KafkaCluster:
    """One combined KRaft node of `version` (unavailable() when it cannot run here)."""
    missing = missing_tools()
    if missing:
        unavailable(
            f"Apache Kafka needs {' and '.join(missing)}: run scripts/bootstrap "
            "(installs default-jdk-headless and maven from Debian)"
        )
    directory = Path(tempfile.mkdtemp(prefix=f"luma-kafka-{version}-"))
    try:
        cluster = KafkaCluster.combined(directory, version, secure=secure)
    except KafkaLauncherError as exc:
        pytest.fail(f"Apache Kafka {version} cannot be fetched: {exc}")
    try:
        return cluster.start()
    except KafkaLauncherError as exc:
        cluster.kill()  # the log tails are in the message; the directory stays for a look
        pytest.fail(f"Apache Kafka {version} did not start: {exc}")


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[KafkaCluster]:
    """Apache Kafka (one combined node, `LUMA_TEST_KAFKA_VERSION`), with a SCRAM/TLS listener."""
    cluster = start_apache_kafka(kafka_version(), secure=True)
    try:
        yield cluster
    finally:
        cluster.remove()


def _apache_broker(request: pytest.FixtureRequest) -> Iterator[KafkaBroker]:
    if missing_tools() and _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        # testcontainers' own (Confluent) image, not the pinned release; unused where java is.
        with KafkaContainer() as container:
            yield KafkaBroker(container.get_bootstrap_server(), True, "testcontainers")
        return
    cluster: KafkaCluster = request.getfixturevalue("apache_kafka")
    yield KafkaBroker(cluster.bootstrap, True, "apache", cluster.version, cluster.secure)


def _tansu_broker() -> Iterator[KafkaBroker]:
    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        unavailable(f"no Tansu broker: {exc}")
    try:
        yield KafkaBroker(broker.bootstrap, supports_idempotence=False, kind="tansu")
    finally:
        broker.stop()


@pytest.fixture(scope="session", params=chosen_brokers())
def kafka_broker(request: pytest.FixtureRequest) -> Iterator[KafkaBroker]:
    kind = request.param
    if kind == "external":
        configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not configured:
            unavailable("LUMA_TEST_BROKER=external needs KAFKA_BOOTSTRAP_SERVERS")
        yield KafkaBroker(configured, supports_idempotence=True, kind="external")
    elif kind == "apache":
        yield from _apache_broker(request)
    else:
        yield from _tansu_broker()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, which it may freeze (SIGSTOP) without disturbing others."""
    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        unavailable(f"no embedded broker for outage tests: {exc}")
        return
    try:
        yield broker
    finally:
        broker.stop()
