"""Fixtures shared by the integration tests: an in-process bridge on the real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from bridge.server import BridgeServer
from bridge.settings import Settings
from tests.conftest import KafkaBroker
from tests.helpers import bridge_settings, running_bridge


@pytest.fixture
def settings(kafka_broker: KafkaBroker) -> Settings:
    """Settings with a topic prefix of this test's own."""
    return bridge_settings(kafka_broker.bootstrap, kafka_broker.supports_idempotence)


@pytest.fixture
async def bridge(settings: Settings) -> AsyncIterator[BridgeServer]:
    async with running_bridge(settings) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
