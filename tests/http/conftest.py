"""Fixtures of the HTTP tests: ``domain``, a hub, two leaves and an agent with a gateway on each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from http_domain import GATEWAY, Domain

from cim_place.local.topologies import Hub
from cim_place.testing import LeafFactory, two_agents


@pytest.fixture
async def domain(hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path) -> AsyncIterator[Domain]:
    async with two_agents(hub1, leaf_factory, tmp_path, http=GATEWAY) as (agent_a, agent_b):
        yield Domain(hub1, agent_a, agent_b)
