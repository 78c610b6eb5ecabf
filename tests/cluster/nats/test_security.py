"""Generated users and permissions, tested against real servers running them.

A hub and two leaves (a, b) run the accounts ``cim-place security gen`` produces. An agent's
credentials can neither publish another node's events nor consume another node's tasks; the
operator reads but cannot write; the controller writes tasks and locations; a leaf server that
an attacker controls is confined by the hub to its own node's subjects; and real agents run
under these permissions (events, heartbeats, uploads, tasks, block exchange).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig
from nats.js.errors import ServiceUnavailableError
from typer.testing import CliRunner

from cim_place.cli.app import app
from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.exchange.fetch import fetch_dag
from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.nats.security import (
    AccessDeniedError,
    SecurityConfigError,
    client_options,
    identity_of,
    inbox_prefix,
    may_read,
    requester_of,
)
from cim_place.cluster.nats.users import DomainPlan, plan_domain, render_accounts, render_hub_link
from cim_place.cluster.state.nodes import list_nodes
from cim_place.cluster.tasks.model import Task
from cim_place.cluster.tasks.queue import TaskQueue, ensure_task_stream
from cim_place.interfaces import Pin
from cim_place.local.server_spec import ServerSpec, find_nats_server, free_port
from cim_place.local.servers import NatsServer
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import RAW, make_cid

pytestmark = pytest.mark.nats

# -- the model -------------------------------------------------------------------------------------


def test_reader_names_may_not_take_a_service_name() -> None:
    for name in ("agent-x", "leaf-x", "controller", "operator"):
        with pytest.raises(SecurityConfigError, match="reserved"):
            plan_domain(["a"], readers={name: None})
    with pytest.raises(SecurityConfigError, match="not a node of this domain"):
        plan_domain(["a"], readers={"alice": "zz"})
    with pytest.raises(SecurityConfigError, match="twice"):
        plan_domain(["a", "a"])
    with pytest.raises(SecurityConfigError, match="not usable"):
        plan_domain(["a"], readers={"al.ice": None})


def test_identity_comes_from_the_reply_subject_and_the_url() -> None:
    assert requester_of("_CIM_INBOX.alice.abc.1") == "alice"
    assert requester_of("_INBOX.abc.1") is None
    assert requester_of(None) is None
    assert identity_of("nats://alice:pw@h:4222,nats://h2:4222") == "alice"
    assert identity_of(["nats://h:4222"]) is None
    assert identity_of("h:4222") is None
    assert client_options("tls://bob:pw@h:4222") == {"inbox_prefix": "_CIM_INBOX.bob"}
    assert client_options(None) == {}


def test_the_read_rule() -> None:
    root = make_cid(RAW, b"x")
    owned = Pin(root=root, size=1, blocks=1, owner="alice", metadata={"readers": "carol, dan"})
    assert may_read("alice", owned) and may_read("carol", owned) and may_read("dan", owned)
    assert may_read("agent-a", owned)
    assert not may_read("bob", owned) and not may_read(None, owned)
    everyone = Pin(root=root, size=1, blocks=1, owner="alice", metadata={"readers": "*"})
    assert may_read("bob", everyone) and not may_read(None, everyone)
    assert may_read(None, Pin(root=root, size=1, blocks=1))


def test_generated_accounts_pass_the_servers_check(tmp_path: Path) -> None:
    plan = plan_domain(["a", "b"], readers={"alice": "a", "bob": None})
    for name, users in [("hub", plan.hub), *plan.leaves.items()]:
        config = tmp_path / f"{name}.conf"
        config.write_text(render_accounts(users))
        result = os.system(f"{find_nats_server()} -t -c {config} >/dev/null 2>&1")
        assert result == 0, config.read_text()


def test_cli_gen_writes_private_files_and_keeps_existing_ones(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["security", "gen", "--out", str(tmp_path / "out"), "--node", "a", "--node", "b"]
    result = runner.invoke(app, [*args, "--reader", "alice@a", "--reader", "bob"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("hub/accounts.conf", "a/accounts.conf", "a/hub-link.conf", "b/hub-link.conf"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert "CIM_PLACE_SERVER=nats://alice:" in (out / "credentials/alice.env").read_text()
    roster = json.loads((out / "users.json").read_text())["users"]
    assert {"user": "agent-a", "role": "agent", "home": "a"} in roster
    before = (out / "hub/accounts.conf").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "--force" in again.output
    assert (out / "hub/accounts.conf").read_text() == before
    bad = runner.invoke(app, [*args[:4], "--node", "a", "--reader", "x@"])
    assert bad.exit_code == 1 and "NAME@NODE" in bad.output


# -- a secured domain ------------------------------------------------------------------------------


@dataclass
class Domain:
    plan: DomainPlan
    hub: NatsServer
    leaves: dict[str, NatsServer]
    directory: Path

    def password(self, user: str) -> str:
        return next(u.password for u in self.plan.all_users() if u.name == user)

    def url(self, user: str, server: NatsServer) -> str:
        return f"nats://{user}:{self.password(user)}@127.0.0.1:{server.port}"


def _start_leaf(
    plan: DomainPlan, hub: NatsServer, directory: Path, node: str, *, name: str | None = None
) -> NatsServer:
    link = plan.leaf_links[node]
    assert hub.leaf_url is not None
    extra = (
        render_hub_link(link, [hub.leaf_url])
        + 'leafnodes { reconnect: "250ms", remotes: [ { urls: $CIM_PLACE_HUB_URLS, '
        'account: "CIM" } ] }\n' + render_accounts(plan.leaves[node])
    )
    server_name = name or node
    spec = ServerSpec(
        server_name=server_name,
        store_dir=directory / server_name / "js",
        domain=server_name,
        extra=extra,
    )
    leaf = NatsServer(spec, directory / server_name).start().wait_ready()
    leaf.wait_leaf_connected()
    return leaf


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domain]:
    directory = tmp_path_factory.mktemp("secured")
    plan = plan_domain(["a", "b"], readers={"alice": "a", "bob": None})
    hub = NatsServer(
        ServerSpec(
            server_name="hub",
            store_dir=directory / "hub" / "js",
            domain="hub",
            leafnode_port=free_port(),
            extra=render_accounts(plan.hub),
        ),
        directory / "hub",
    )
    leaves: dict[str, NatsServer] = {}
    try:
        hub.start().wait_ready()
        for node in ("a", "b"):
            leaves[node] = _start_leaf(plan, hub, directory, node)
        yield Domain(plan, hub, leaves, directory)
    finally:
        for leaf in leaves.values():
            leaf.stop()
        hub.stop()


class Violations:
    """An error callback that records the permission violations a server reports."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.event = asyncio.Event()

    async def on_error(self, error: Exception) -> None:
        if "permissions violation" in str(error).lower():
            self.seen.append(str(error))
            self.event.set()

    async def wait(self, text: str) -> str:
        async with asyncio.timeout(5):
            while True:
                for seen in self.seen:
                    if text.lower() in seen.lower():
                        return seen
                self.event.clear()
                await self.event.wait()


async def _client(domain: Domain, user: str, server: NatsServer, violations: Violations) -> Client:
    url = domain.url(user, server)
    return await nats.connect(
        url,
        error_cb=violations.on_error,
        allow_reconnect=False,
        **client_options(url),
    )


async def _controller(domain: Domain) -> Client:
    return await connect(domain.url("controller", domain.hub), for_service=True)


async def test_an_agent_publishes_only_its_own_events(domain: Domain) -> None:
    violations = Violations()
    agent = await _client(domain, "agent-a", domain.leaves["a"], violations)
    try:
        await agent.publish("cim.place.evt.a.ObjectStored", b"{}")
        await agent.flush()
        await agent.publish("cim.place.evt.b.ObjectStored", b"forged")
        refused = await violations.wait('publish to "cim.place.evt.b.objectstored"')
        assert "cim.place.evt.b" in refused.lower()
        assert not any("evt.a." in v.lower() for v in violations.seen)
    finally:
        await agent.close()


async def test_an_agent_reads_the_names_its_gateway_resolves_but_cannot_write_them(
    domain: Domain,
) -> None:
    controller = await _controller(domain)
    names = await kv.ensure_bucket(jetstream(controller, "hub"), kv.NAMES, history=5)
    await names.put("docs.report", b"{}")
    violations = Violations()
    agent = await _client(domain, "agent-a", domain.leaves["a"], violations)
    try:
        bucket = await jetstream(agent, "hub").key_value(kv.NAMES)
        assert (await bucket.get("docs.report")).value == b"{}"
        await agent.publish(f"$KV.{kv.NAMES}.docs.report", b"forged")
        await violations.wait(f'publish to "$KV.{kv.NAMES}.docs.report"')
        assert not any("DIRECT.GET" in v or "STREAM.INFO" in v for v in violations.seen)
    finally:
        await agent.close()
        await controller.close()


async def test_an_agent_consumes_only_its_own_tasks(domain: Domain) -> None:
    controller = await _controller(domain)
    js = jetstream(controller, "hub")
    await ensure_task_stream(js, 1)
    queue = TaskQueue(js)
    root = make_cid(RAW, os.urandom(8))
    for node in ("a", "b"):
        await js.add_consumer(
            "CIM_PLACE_TASKS",
            ConsumerConfig(durable_name=f"tasks-{node}", filter_subject=f"cim.place.task.{node}"),
        )
        await queue.enqueue(Task.create("verify", node, root, generation=1))

    violations = Violations()
    agent = await _client(domain, "agent-a", domain.leaves["a"], violations)
    try:
        own = await jetstream(agent, "hub").pull_subscribe_bind("tasks-a", "CIM_PLACE_TASKS")
        messages = await own.fetch(1, timeout=5)
        assert messages[0].subject == "cim.place.task.a"
        await messages[0].ack_sync()  # the ack subject is allowed too

        other = await jetstream(agent, "hub").pull_subscribe_bind("tasks-b", "CIM_PLACE_TASKS")
        with pytest.raises(nats.errors.TimeoutError):
            await other.fetch(1, timeout=1)
        await violations.wait("$JS.hub.API.CONSUMER.MSG.NEXT.CIM_PLACE_TASKS.tasks-b")
        left = await js.consumer_info("CIM_PLACE_TASKS", "tasks-b")
        assert left.num_pending == 1 and left.num_ack_pending == 0
    finally:
        await agent.close()
        await js.delete_stream("CIM_PLACE_TASKS")
        await controller.close()


async def test_the_operator_reads_but_cannot_write(domain: Domain) -> None:
    controller = await _controller(domain)
    await kv.ensure_bucket(jetstream(controller, "hub"), kv.POLICIES, history=5)
    violations = Violations()
    operator = await _client(domain, "operator", domain.hub, violations)
    try:
        js = jetstream(operator, "hub")
        bucket = await js.key_value(kv.POLICIES)
        assert bucket is not None
        await operator.publish(f"$KV.{kv.POLICIES}.default", b"policy: forged")
        await violations.wait(f'publish to "$KV.{kv.POLICIES}.default"')
        await operator.publish("cim.place.task.a", b"forged")
        await violations.wait('publish to "cim.place.task.a"')
    finally:
        await operator.close()
        await controller.close()


async def test_the_controller_writes_tasks_and_locations(domain: Domain) -> None:
    controller = await _controller(domain)
    js = jetstream(controller, "hub")
    try:
        await ensure_task_stream(js, 1)
        queued = await TaskQueue(js).enqueue(
            Task.create("fetch", "b", make_cid(RAW, b"t"), generation=1, holders=["a"])
        )
        assert queued.sequence >= 1
        locations = await kv.ensure_bucket(js, kv.LOCATIONS, history=1)
        assert await locations.put("some-cid", b"{}") >= 1
    finally:
        await js.delete_stream("CIM_PLACE_TASKS")
        await controller.close()


async def test_a_seized_leaf_is_confined_to_its_own_node(domain: Domain) -> None:
    """An attacker runs their own server with leaf a's link credentials and no local limits:
    the hub still refuses it node b's tasks."""
    controller = await _controller(domain)
    js = jetstream(controller, "hub")
    await ensure_task_stream(js, 1)
    await js.add_consumer(
        "CIM_PLACE_TASKS",
        ConsumerConfig(durable_name="tasks-b", filter_subject="cim.place.task.b"),
    )
    await TaskQueue(js).enqueue(Task.create("verify", "b", make_cid(RAW, b"r"), generation=1))
    rogue_dir = domain.directory / "rogue"
    assert domain.hub.leaf_url is not None
    rogue = NatsServer(
        ServerSpec(
            server_name="rogue",
            store_dir=rogue_dir / "js",
            domain="rogue",
            # No accounts: anyone connecting may do anything on this server.
            extra=render_hub_link(domain.plan.leaf_links["a"], [domain.hub.leaf_url])
            + "leafnodes { remotes: [ { urls: $CIM_PLACE_HUB_URLS } ] }\n",
        ),
        rogue_dir,
    )
    try:
        rogue.start().wait_ready()
        rogue.wait_leaf_connected()
        attacker = await nats.connect(rogue.url, allow_reconnect=False)
        try:
            pulled = jetstream(attacker, "hub")
            sub = await pulled.pull_subscribe_bind("tasks-b", "CIM_PLACE_TASKS")
            # Refused at the hub: the pull finds no responder (or no answer at all).
            with pytest.raises((nats.errors.TimeoutError, ServiceUnavailableError)):
                await sub.fetch(1, timeout=1.5)
            # It cannot even learn that the consumer exists.
            with pytest.raises(
                (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)
            ):
                await pulled.consumer_info("CIM_PLACE_TASKS", "tasks-b", timeout=1)
        finally:
            await attacker.close()
        left = await js.consumer_info("CIM_PLACE_TASKS", "tasks-b")
        assert left.num_pending == 1
    finally:
        rogue.stop()
        await js.delete_stream("CIM_PLACE_TASKS")
        await controller.close()


async def test_agents_run_under_the_generated_permissions(domain: Domain, tmp_path: Path) -> None:
    """Whole agents: outbox sourced by the hub, heartbeats, an upload from a user homed on the
    leaf, a fetch task between leaves; a user the owner did not list is refused."""
    controller = await _controller(domain)
    js = jetstream(controller, "hub")
    await ensure_event_store(js, replicas=1)
    await ensure_task_stream(js, 1)
    agents = []
    for node in ("a", "b"):
        config = AgentConfig(
            node=node,
            volumes=(VolumeConfig("v0", tmp_path / node),),
            servers=(domain.url(f"agent-{node}", domain.leaves[node]),),
            heartbeat=0.5,
        )
        agents.append(Agent(config))
    alice = bob = None
    try:
        for agent in agents:
            await agent.start()
        alice = await connect(domain.url("alice", domain.leaves["a"]))
        bob = await connect(domain.url("bob", domain.hub))
        content = os.urandom(2 * (1 << 20) + 99)
        result = await upload(
            alice, "a", io.BytesIO(content), owner="alice", metadata={"readers": "carol"}
        )
        await TaskQueue(js).enqueue(
            Task.create(
                "fetch",
                "b",
                result.cid,
                generation=1,
                holders=["a"],
                owner="alice",
                metadata={"readers": "carol"},
            )
        )
        async with asyncio.timeout(20):
            while agents[1].pinned_on(result.cid) is None:
                await asyncio.sleep(0.1)
            while {n.node for n in await list_nodes(js)} != {"a", "b"}:
                await asyncio.sleep(0.1)
            # NodeJoined of both, ObjectStored of both, the task's outcome: sourced from outboxes.
            while (await js.stream_info("CIM_PLACE_EVENTS")).state.messages < 5:
                await asyncio.sleep(0.2)
        blocks = FsBlockStore(tmp_path / "bob", fsync="none")
        try:
            with pytest.raises(AccessDeniedError, match="not allowed: bob"):
                await fetch_dag(bob, result.cid, [Holder("a"), Holder("b")], blocks, timeout=3)
        finally:
            blocks.close()
    finally:
        for client in (alice, bob):
            if client is not None:
                await client.close()
        await asyncio.gather(*(agent.stop(grace=1) for agent in agents))
        await js.delete_stream("CIM_PLACE_TASKS")
        await js.delete_stream("CIM_PLACE_EVENTS")
        await controller.close()


def test_inbox_prefix_is_per_user() -> None:
    assert inbox_prefix("alice") == "_CIM_INBOX.alice"
    with pytest.raises(SecurityConfigError):
        inbox_prefix("a.b")
