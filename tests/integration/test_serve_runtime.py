"""What `serve` does to the process once the bridge serves: the garbage collector is tuned
off the callback path (startup objects frozen, a young generation sized for the callbacks
in flight). In process, on the real broker, with the collector restored afterwards."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import pytest

from bridge.delivery.topics import create_topics
from bridge.server import GC_YOUNG_THRESHOLD, BridgeServer, serve
from bridge.settings import Settings
from tests.helpers import topics_visible


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
async def test_serving_freezes_what_startup_made_and_widens_the_young_generation(
    settings: Settings,
) -> None:
    seen: dict[str, object] = {}

    def on_serving(server: BridgeServer) -> None:
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        seen["publisher collected"] = any(
            found is server.publisher
            for generation in range(3)
            for found in gc.get_objects(generation)
        )
        os.kill(os.getpid(), signal.SIGTERM)  # the graceful stop `serve` waits for

    await create_topics(settings)
    await topics_visible(settings)
    assert gc.get_freeze_count() == 0
    await serve(settings, on_serving=on_serving)

    assert seen["threshold"] == (GC_YOUNG_THRESHOLD, 20, 20)
    assert isinstance(seen["frozen"], int)
    assert seen["frozen"] > 10_000
    # A frozen object is in no generation a collection walks.
    assert seen["publisher collected"] is False


@pytest.mark.usefixtures("collector_restored")
async def test_with_tune_gc_off_the_collector_keeps_cpythons_settings(settings: Settings) -> None:
    seen: dict[str, object] = {}

    def on_serving(server: BridgeServer) -> None:
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        os.kill(os.getpid(), signal.SIGTERM)

    await create_topics(settings)
    await topics_visible(settings)
    before = gc.get_threshold()
    await serve(settings.model_copy(update={"tune_gc": False}), on_serving=on_serving)

    assert seen == {"threshold": before, "frozen": 0}
