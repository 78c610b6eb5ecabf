"""Fixtures of the agent tests: ``agents``, a 1-server hub with leaves node-a and node-b, an agent
on each (scrubs only when a test asks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cim_place.cluster.agent.service import Agent
from cim_place.local.topologies import Hub
from cim_place.testing import NO_SCHEDULED_SCRUB, LeafFactory, two_agents


@pytest.fixture
async def agents(
    hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path
) -> AsyncIterator[tuple[Hub, Agent, Agent]]:
    async with two_agents(hub1, leaf_factory, tmp_path, scrub_interval=NO_SCHEDULED_SCRUB) as (
        agent_a,
        agent_b,
    ):
        yield hub1, agent_a, agent_b
