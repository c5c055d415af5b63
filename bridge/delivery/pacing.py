"""At most one metadata request every `METADATA_BACKOFF_SECONDS` from the producer.

While a partition it holds records for has no leader (every replica down, the other
brokers up), aiokafka's sender asks the cluster for metadata again as soon as the last
answer came, and the brokers that are up answer at once. In the Apache Kafka fault
scenario that was 325 to 372 metadata requests a second from one bridge, for as long as
the partition stayed offline (the bridge at 37 % of a core under that scenario's load,
15 % paced). The Java producer allows one metadata update per `retry.backoff.ms`
(100 ms by default); the bridge's producers now do the same.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiokafka.client import AIOKafkaClient

METADATA_BACKOFF_SECONDS = 0.1


def pace_metadata_updates(
    client: AIOKafkaClient, backoff: float = METADATA_BACKOFF_SECONDS
) -> None:
    """Make `client` start a metadata update no sooner than `backoff` after the last ended.

    aiokafka's client runs one update at a time and hands every caller that asks for one
    meanwhile the same pending answer, so a caller waits at most `backoff` longer, and a
    sender looping on an offline partition is held to one request per `backoff`.
    """
    update = client._metadata_update
    ended = -math.inf

    async def paced(cluster_metadata: Any, topics: Any) -> bool:
        nonlocal ended
        loop = asyncio.get_running_loop()
        wait = ended + backoff - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            return bool(await update(cluster_metadata, topics))
        finally:
            ended = loop.time()

    client._metadata_update = paced
