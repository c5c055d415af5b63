"""The start-up compatibility check: refusals stop `serve` with one line and exit 78;
an unreachable broker is left to the retries."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.protocol.transaction import InitProducerIdRequest

from bridge.delivery.compat import (
    EXIT_INCOMPATIBLE_BROKER,
    IncompatibleBroker,
    check_broker,
    client_versions,
    needed_requests,
    unsupported,
)
from bridge.devtools.embedded import EmbeddedBroker, free_port
from bridge.settings import load_settings


def test_the_installed_aiokafka_lists_its_request_versions() -> None:
    # compat reads aiokafka's private per-version list; an upgrade that moves it fails here.
    assert client_versions(ProduceRequest)[0] == 0
    assert len(client_versions(MetadataRequest)) > 1
    assert client_versions(InitProducerIdRequest) == [0]


def test_idempotence_adds_init_producer_id_to_what_is_needed() -> None:
    on = load_settings(kafka_enable_idempotence=True)
    off = load_settings(kafka_enable_idempotence=False)
    assert InitProducerIdRequest in needed_requests(on)
    assert InitProducerIdRequest not in needed_requests(off)


def test_a_request_offered_only_in_newer_versions_is_reported() -> None:
    ours = client_versions(ProduceRequest)
    offered = {ProduceRequest.API_KEY: (ours[-1] + 1, ours[-1] + 5)}
    [problem] = unsupported(offered, [ProduceRequest])
    assert problem.startswith("Produce (broker speaks")
    assert unsupported(offered, []) == []


def test_a_request_not_offered_at_all_is_reported() -> None:
    assert unsupported({}, [InitProducerIdRequest]) == ["InitProducerId (not offered at all)"]


def test_overlapping_versions_pass() -> None:
    offered = {ProduceRequest.API_KEY: (3, 13), MetadataRequest.API_KEY: (0, 13)}
    assert unsupported(offered, [ProduceRequest, MetadataRequest]) == []


async def test_an_unreachable_broker_is_not_the_checks_business() -> None:
    settings = load_settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    await check_broker(settings)  # returns: the caller's retry loop takes over
    assert time.monotonic() - started < 5


@pytest.mark.integration
async def test_tansu_with_idempotence_on_is_refused(own_broker: EmbeddedBroker) -> None:
    settings = load_settings(kafka_bootstrap_servers=own_broker.bootstrap)
    with pytest.raises(IncompatibleBroker, match="lacks the idempotent producer"):
        await check_broker(settings)
    await check_broker(
        load_settings(**{**settings.model_dump(), "kafka_enable_idempotence": False})
    )


@pytest.mark.integration
def test_serve_on_tansu_with_idempotence_on_exits_78_with_one_line(
    own_broker: EmbeddedBroker, tmp_path: object
) -> None:
    argv = [
        sys.executable, "-m", "bridge", "serve",
        "--kafka-bootstrap-servers", own_broker.bootstrap,
        "--auth-tokens", "compat-token-0123456789",
        "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
        "--spool-dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EXIT_INCOMPATIBLE_BROKER, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "lacks the idempotent producer" in lines[0]
    assert "LUMA_BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=false" in lines[0]
    assert "retrying" not in result.stderr
