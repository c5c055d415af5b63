"""`KafkaPublisher.stop` on a real broker that stopped answering: the producer whose flush
cannot finish is abandoned, and leaves no task of its own waiting."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from prometheus_client import CollectorRegistry

from bridge.delivery.publisher import KafkaPublisher, Record
from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError
from bridge.ops.metrics import Metrics
from tests.conftest import unavailable
from tests.faults.harness import frozen
from tests.helpers import bridge_settings, wait_until


def aiokafka_tasks() -> list[asyncio.Task[object]]:
    """The tasks still waiting that run aiokafka's code."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "aiokafka" in task.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    ]


async def test_an_abandoned_producer_leaves_no_task_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiokafka's `stop()` flushes in a task of its own. Cut off by the stop timeout, that
    task waited for good on the records the frozen broker never acknowledged, and asyncio
    logged "Task was destroyed but it is pending!" at ERROR when it was collected (seen in
    the fault scenarios' bridge logs, after a producer renewal)."""
    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        unavailable(f"no embedded broker: {exc}")
    gc.collect()  # what earlier tests left behind is not this test's to judge
    caplog.clear()
    try:
        settings = bridge_settings(broker.bootstrap, idempotence=False)
        topic = f"{settings.topic_prefix}.lifecycle"
        publisher = KafkaPublisher(settings, metrics=Metrics(CollectorRegistry()))
        await publisher.start()
        await publisher.publish([Record(topic, b"g1", b"1", [])], ack_timeout=30)
        with frozen(broker), caplog.at_level(logging.ERROR, logger="asyncio"):
            unanswered = publisher.send([Record(topic, b"g2", b"2", [])])
            await publisher.stop(timeout=0.5)
            # Failed, not acknowledged: the caller keeps the record (in `serve`, spooled).
            assert all(future.exception() is not None for future in unanswered)
            await wait_until(
                lambda: not aiokafka_tasks(), timeout=2, what="the abandoned producer's tasks"
            )
            del publisher, unanswered
            gc.collect()  # what is left unfinished or unretrieved says so when it is collected
            await asyncio.sleep(0)
    finally:
        broker.stop()
    assert [record.getMessage() for record in caplog.records if record.name == "asyncio"] == []
