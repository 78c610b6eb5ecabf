"""Heartbeats in KV ``cim-place-nodes`` against a real JetStream server."""

from __future__ import annotations

import asyncio

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.state.nodes import Heartbeat, NodeRecord, list_nodes
from cim_place.local.servers import NatsServer


async def test_an_early_beat_is_written_at_once_then_the_interval_resumes(
    nats_server: NatsServer,
) -> None:
    used = [0]

    def record() -> NodeRecord:
        return NodeRecord(node="n1", labels={"used": str(used[0])})

    async with connected(nats_server.url) as nc:
        js = jetstream(nc)
        heartbeat = Heartbeat(js, record, interval=3600.0)
        await heartbeat.start()
        try:
            async with asyncio.timeout(10):
                while heartbeat.beats < 1:
                    await asyncio.sleep(0.01)
                used[0] = 42
                heartbeat.soon()
                heartbeat.soon()  # asked twice: one early beat
                while [r.labels.get("used") for r in await list_nodes(js)] != ["42"]:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(Heartbeat.MIN_GAP * 1.5)
            assert heartbeat.beats == 2  # not one more until the hour is over
        finally:
            await heartbeat.stop()
