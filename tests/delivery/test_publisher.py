"""The producer's partitioning: the same placement as every other Kafka client."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
from aiokafka import errors
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer import sender
from prometheus_client import CollectorRegistry

from bridge.delivery.publisher import (
    Failure,
    NotConnected,
    RetryCounter,
    classify,
    keyed_partitioner,
    settle_within,
)
from bridge.ops.metrics import Metrics


def test_the_cached_partitioner_places_keys_as_the_java_client_does() -> None:
    partitions = list(range(6))
    for n in range(200):
        key = f"generation-{n}".encode()
        expected = DefaultPartitioner()(key, partitions, partitions)
        assert keyed_partitioner(key, partitions, partitions) == expected
    assert keyed_partitioner(None, partitions, [4]) == 4


def test_the_producers_retry_warnings_are_counted() -> None:
    metrics = Metrics(CollectorRegistry())
    counter = RetryCounter(metrics)
    sender_log = logging.getLogger(RetryCounter.LOGGER)
    sender_log.addFilter(counter)
    try:
        sender_log.warning(
            "Got error produce response on topic-partition %s, retrying. Error: %s", "t-0", "x"
        )
        sender_log.warning("Cannot send %r to %s: %r", "ProduceRequest", 1, "timeout")
        sender_log.warning("something else")
    finally:
        sender_log.removeFilter(counter)
    assert metrics.registry.get_sample_value("luma_bridge_kafka_produce_retries_total") == 2


def test_the_retry_openings_are_aiokafkas_own_words() -> None:
    source = inspect.getsource(sender)
    for opening in RetryCounter.OPENINGS:
        assert f'"{opening}' in source


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (errors.KafkaTimeoutError(), Failure.RETRY),
        (errors.RequestTimedOutError(), Failure.RETRY),
        (errors.KafkaConnectionError(), Failure.RETRY),
        (errors.NotLeaderForPartitionError(), Failure.RETRY),
        (errors.MessageSizeTooLargeError(), Failure.RECORD),
        (errors.RecordTooLargeError(), Failure.RECORD),
        (errors.CorruptRecordException(), Failure.RECORD),
        (errors.TopicAuthorizationFailedError(), Failure.TOPIC),
        (errors.UnknownTopicOrPartitionError(), Failure.TOPIC),
        (errors.OutOfOrderSequenceNumber(), Failure.PRODUCER),
        (errors.ProducerFenced(), Failure.PRODUCER),
        (errors.KafkaError("Unexpected error during batch delivery"), Failure.PRODUCER),
        (NotConnected(), Failure.RETRY),
        (errors.InvalidRequiredAcksError(), Failure.TOPIC),
        (errors.UnknownError(), Failure.TOPIC),
    ],
)
def test_errors_are_sorted_by_what_can_be_done_about_them(
    error: BaseException, failure: Failure
) -> None:
    assert classify(error) is failure


async def test_settle_within_returns_when_every_future_is_done() -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[int]] = [loop.create_future() for _ in range(3)]
    futures[0].set_result(0)
    loop.call_soon(futures[1].set_result, 1)
    loop.call_later(0.01, futures[2].set_exception, RuntimeError("refused"))
    started = loop.time()
    await settle_within(futures, 30)
    assert loop.time() - started < 10  # not the 30 s deadline
    assert all(future.done() for future in futures)


async def test_settle_within_gives_up_at_the_deadline_without_cancelling() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    done.set_result(1)
    pending: asyncio.Future[int] = loop.create_future()
    await settle_within([done, pending], 0.01)
    assert not pending.done()  # left to resolve later: a record may still land
    pending.set_result(2)  # its callback was removed: nothing fires into a finished wait
    await asyncio.sleep(0)
    assert pending.result() == 2


async def test_settle_within_leaves_no_callback_when_its_waiter_is_cancelled() -> None:
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.create_task(settle_within([pending], 30))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pending.remove_done_callback(lambda _: None) == 0
    assert not pending._callbacks  # asyncio's own list of done callbacks
