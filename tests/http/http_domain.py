"""A domain of two agents whose gateways listen on loopback, for the HTTP tests (the fixture is
``domain`` in this folder's conftest)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from cim_place.cluster.agent.config import AgentConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected
from cim_place.http.server import HttpSettings
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import Cid
from cim_place.testing import agent_config

GATEWAY = HttpSettings(listen="127.0.0.1:0")
"""Each agent's gateway, on a free loopback port."""


def config(name: str, url: str, tmp: Path, zone: str) -> AgentConfig:
    return agent_config(name, url, tmp, zone, http=GATEWAY)


@dataclass
class Domain:
    hub: Hub
    a: Agent
    b: Agent

    def url(self, agent: Agent) -> str:
        assert agent.http is not None
        return agent.http.urls["gateway"]


async def upload_to(domain: Domain, node: str, data: bytes) -> Cid:
    """Add ``data`` through ``node``'s agent (pinned there only)."""
    async with connected(domain.hub.url) as nc:
        assert await wait_for_holder(nc, node, timeout=10)
        return (await upload(nc, node, io.BytesIO(data), size=len(data))).cid
