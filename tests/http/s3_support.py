"""A node with the S3 API for tests: a 1-server hub, one leaf, its agent, the S3 app on a free
loopback port, and an access key. Imported by the test_s3_* modules (fixture ``s3node``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.http.s3 import S3Key, S3Node, build_s3_app
from cim_place.http.s3.keys import KeyStore
from cim_place.local.topologies import Hub
from cim_place.testing import LeafFactory

NODE = "node-a"


@dataclass
class S3Domain:
    hub: Hub
    agent: Agent
    url: str
    key: S3Key
    app: web.Application

    def client(self, *, secret: str | None = None, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.key.access_key,
            aws_secret_access_key=secret or self.key.secret_key,
            region_name="us-east-1",
            config=Config(
                signature_version="s3v4",
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
                **config,
            ),
        )


def s3_node_of(agent: Agent) -> S3Node:
    """The collaborators of the S3 API, taken from a running agent (the agent's own wiring)."""
    assert agent.nc is not None and agent.publisher is not None
    return S3Node(
        node=agent.node,
        volumes=agent.volumes,
        volume_for=agent._volume_for,
        js_hub=jetstream(agent.nc, agent.config.hub_domain),
        events=agent.publisher,
        on_pinned=agent._uploaded,
        on_unpinned=agent._announce_removed,
        nc=agent.nc,
        subjects=agent.subjects,
        on_read=agent._record_read,
    )


@pytest.fixture
async def s3node(hub1: Hub, leaf_factory: LeafFactory, tmp_path: Path) -> AsyncIterator[S3Domain]:
    leaf = leaf_factory(NODE)
    async with connected(hub1.url) as nc:
        js_hub = jetstream(nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        await ensure_task_stream(js_hub, 1)
        key = await KeyStore(js_hub).create(note="tests")
    agent = Agent(
        AgentConfig(
            node=NODE,
            volumes=(VolumeConfig("v0", tmp_path / NODE / "v0"),),
            servers=(leaf.url,),
            labels={"region": "eu", "zone": "z1", "host": NODE},
            heartbeat=0.5,
            inventory=3600,
        ),
        fsync="none",
    )
    await agent.start()
    app = build_s3_app(s3_node_of(agent))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield S3Domain(hub1, agent, f"http://127.0.0.1:{port}", key, app)
    finally:
        await runner.cleanup()
        await agent.stop(grace=1)
