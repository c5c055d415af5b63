"""The write token Luma echoes in `request.callback_url` never reaches Kafka (issue 11),
through the whole bridge and the real broker: per-state, lifecycle and dead-letter topics."""

from __future__ import annotations

import json

import aiohttp

from bridge.contract.callback import REDACTED, event_id_for
from bridge.server import BridgeServer
from tests.helpers import SEED_COMPLETED_VIDEO, TOKEN, callback_url, read_topic


async def test_no_record_holds_the_write_token(
    bridge: BridgeServer, http: aiohttp.ClientSession
) -> None:
    url = callback_url(bridge)
    generation = {
        **SEED_COMPLETED_VIDEO,
        "request": {**SEED_COMPLETED_VIDEO["request"], "callback_url": url},
    }
    async with http.post(url, json=generation) as response:
        assert response.status == 200
        event_id = (await response.json())["event_id"]
    async with http.post(url, json={**generation, "state": 7}) as response:
        assert response.status == 400
    prefix = bridge.settings.topic_prefix
    bootstrap = bridge.settings.kafka_bootstrap_servers
    written = [
        *await read_topic(bootstrap, f"{prefix}.completed", expected=1),
        *await read_topic(bootstrap, f"{prefix}.lifecycle", expected=1),
        *await read_topic(bootstrap, f"{prefix}.deadletter", expected=1),
    ]
    for record in written:
        assert TOKEN.encode() not in record.value
    value = json.loads(written[0].value)
    assert value["request"]["callback_url"] == url.replace(TOKEN, REDACTED)
    # The event id is the hash of what was written, so a consumer can recompute it.
    assert event_id == event_id_for(value["id"], value["state"], written[0].value)
    assert dict(written[0].headers)["luma-event-id"] == event_id.encode()
