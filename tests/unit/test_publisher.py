"""The producer's partitioning: the same placement as every other Kafka client."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from bridge.publisher import keyed_partitioner


def test_the_cached_partitioner_places_keys_as_the_java_client_does() -> None:
    partitions = list(range(6))
    for n in range(200):
        key = f"generation-{n}".encode()
        expected = DefaultPartitioner()(key, partitions, partitions)
        assert keyed_partitioner(key, partitions, partitions) == expected
    assert keyed_partitioner(None, partitions, [4]) == 4
