"""Fixtures of the HTTP tests: ``domain``, a hub, two leaves and an agent with a gateway on each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from http_domain import Domain, config

from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.local.topologies import Hub
from cim_place.testing import LeafFactory


@pytest.fixture
async def domain(hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path) -> AsyncIterator[Domain]:
    leaf_a = leaf_factory("node-a")
    leaf_b = leaf_factory("node-b")
    async with connected(hub1.url) as nc:
        js_hub = jetstream(nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        await ensure_task_stream(js_hub, 1)
    agent_a = Agent(config("node-a", leaf_a.url, tmp_path, "z1"), fsync="none")
    agent_b = Agent(config("node-b", leaf_b.url, tmp_path, "z2"), fsync="none")
    await agent_a.start()
    await agent_b.start()
    try:
        yield Domain(hub1, agent_a, agent_b)
    finally:
        await agent_a.stop(grace=1)
        await agent_b.stop(grace=1)
