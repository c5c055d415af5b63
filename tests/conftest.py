"""Shared fixtures: a real Kafka-protocol broker, chosen as the README says.

`KAFKA_BOOTSTRAP_SERVERS` when set; else testcontainers' Kafka when a Docker
engine answers; else the embedded Tansu broker on a free loopback port. Under
CI=true a missing broker fails the tests that need it instead of skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import pytest

from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip locally, fail in CI: a test that needs a component must not pass without it."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required components must be present)")
    pytest.skip(reason)


@dataclass(frozen=True)
class KafkaBroker:
    """A running broker: where it is, and whether it has the idempotent producer."""

    bootstrap: str
    supports_idempotence: bool
    kind: str


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield KafkaBroker(configured, supports_idempotence=True, kind="external")
        return
    if _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield KafkaBroker(
                container.get_bootstrap_server(), supports_idempotence=True, kind="testcontainers"
            )
        return
    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        unavailable(f"no Kafka broker: {exc}")
        return
    try:
        yield KafkaBroker(broker.bootstrap, supports_idempotence=False, kind="tansu")
    finally:
        broker.stop()


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
