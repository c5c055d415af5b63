"""Whether the Kafka cluster can do what the bridge asks of it, asked once at start-up.

A broker that refuses a request the producer depends on (a protocol version removed by a
newer Kafka, KIP-896; the idempotent producer on a broker without it, such as Tansu)
would otherwise look like an unreachable cluster: the producer fails to start and the
bridge retries forever. `check_broker` asks the first reachable bootstrap broker for its
API versions and, with idempotence on, for a producer id, and raises `IncompatibleBroker`
with one line that says what to change. An unreachable cluster is not its business: it
returns and the caller's retry loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import __version__ as aiokafka_version
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import ApiVersionRequest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.protocol.transaction import InitProducerIdRequest

from bridge.settings import Settings, security_options

log = logging.getLogger("bridge.delivery.compat")

# EX_CONFIG (sysexits.h): the configuration does not fit the broker; retrying cannot help.
EXIT_INCOMPATIBLE_BROKER = 78

# How long the whole check may take against a broker that accepts connections.
CHECK_SECONDS = 10.0

IDEMPOTENCE_HINT = (
    "set LUMA_BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=false (or --kafka-enable-idempotence false) "
    "for this broker; Apache Kafka has it and needs no change"
)


class IncompatibleBroker(RuntimeError):
    """The reachable cluster refuses a request the bridge needs; the message says what to do."""

    exit_code = EXIT_INCOMPATIBLE_BROKER


def needed_requests(settings: Settings) -> list[Any]:
    """The aiokafka request types `serve` sends to the cluster with these settings."""
    needed: list[Any] = [MetadataRequest, ProduceRequest]
    if settings.kafka_enable_idempotence:
        needed.append(InitProducerIdRequest)
    return needed


def client_versions(request_type: Any) -> list[int]:
    """The versions of `request_type` this aiokafka can speak (its `_CLASSES`, one per version).

    A private attribute, but the only place aiokafka keeps the list; tests/delivery checks
    it against the installed aiokafka so an upgrade that moves it fails a test.
    """
    return sorted(int(struct.API_VERSION) for struct in request_type._CLASSES)


def unsupported(broker_versions: dict[int, tuple[int, int]], request_types: list[Any]) -> list[str]:
    """A description of each request the broker cannot take in any version aiokafka speaks."""
    problems = []
    for request_type in request_types:
        ours = client_versions(request_type)
        name = request_type.__name__.removesuffix("Request")
        offered = broker_versions.get(request_type.API_KEY)
        if offered is None:
            problems.append(f"{name} (not offered at all)")
            continue
        low, high = offered
        if not any(low <= version <= high for version in ours):
            problems.append(
                f"{name} (broker speaks v{low}-v{high}, aiokafka {aiokafka_version} "
                f"speaks v{ours[0]}-v{ours[-1]})"
            )
    return problems


async def check_broker(settings: Settings) -> None:
    """Raise `IncompatibleBroker` when a reachable broker refuses what the bridge needs.

    Returns quietly when the cluster is compatible, and when no bootstrap broker can be
    reached (or authenticated to): that is for the caller's retries and messages.
    """
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            conn = await _first_connection(settings)
            if conn is None:
                return
            try:
                await _check_connection(conn, settings)
            finally:
                conn.close()
    except TimeoutError:
        log.warning("the broker compatibility check timed out; going on without it")


async def _first_connection(settings: Settings) -> Any:
    options = security_options(settings)
    for address in settings.kafka_bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            return await create_conn(
                host.strip("[]"),
                int(port),
                client_id=settings.kafka_client_id,
                request_timeout_ms=settings.kafka_request_timeout_ms,
                **options,
            )
        except (OSError, KafkaError, ValueError):
            continue
    return None


async def _check_connection(conn: Any, settings: Settings) -> None:
    response = await conn.send(ApiVersionRequest())
    versions = {key: (low, high) for key, low, high in response.api_versions}
    problems = unsupported(versions, needed_requests(settings))
    if problems:
        idempotence = any(p.startswith("InitProducerId") for p in problems)
        raise IncompatibleBroker(
            f"the Kafka broker at {conn.host}:{conn.port} refuses requests the bridge needs: "
            f"{'; '.join(problems)}; "
            + (
                IDEMPOTENCE_HINT
                if idempotence and len(problems) == 1
                else "use a Kafka release that aiokafka supports (see docs/kafka-compatibility.md)"
            )
        )
    if settings.kafka_enable_idempotence:
        await _check_idempotence(conn)


async def _check_idempotence(conn: Any) -> None:
    """Ask for a producer id as the idempotent producer does; a refusal ends start-up.

    Tansu lists InitProducerId among its APIs and answers it with UNKNOWN_SERVER_ERROR,
    so only asking tells. Retriable answers (a coordinator still loading) prove nothing
    either way and let start-up go on.
    """
    try:
        response = await conn.send(
            InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000)
        )
    except KafkaError:
        return
    error = for_code(response.error_code)
    if response.error_code == 0 or error.retriable:
        return
    if "Authorization" in error.__name__:
        raise IncompatibleBroker(
            f"the Kafka broker at {conn.host}:{conn.port} does not let this client use the "
            f"idempotent producer ({error.__name__}): grant it WRITE on the bridge's topics "
            "(IDEMPOTENT_WRITE on the cluster before Kafka 2.8), or set "
            "LUMA_BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=false"
        )
    raise IncompatibleBroker(
        f"the Kafka broker at {conn.host}:{conn.port} lacks the idempotent producer "
        f"(InitProducerId answered {error.__name__}); {IDEMPOTENCE_HINT}"
    )
