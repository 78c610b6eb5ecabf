"""pytest fixtures that run real nats-server topologies (load with ``pytest_plugins``).

Fixtures (function scoped unless noted):

- ``nats_server``: one standalone JetStream server (no domain), a ``NatsServer``.
- ``hub1``: the development topology: a 1-server hub, JetStream domain ``hub``, accepting leaves.
- ``hub``: a fresh 3-server clustered hub, JetStream domain ``hub``; use it when a test stops,
  restarts or otherwise mutates hub members.
- ``hub_cluster`` (module scoped): a shared 3-server hub; tests may add streams and buckets with
  unique names but must not stop members or assume it is empty.
- ``leaf_factory``: ``leaf_factory(name, *, hub=None, via_proxy=False) -> NatsServer`` starts a
  leaf (JetStream domain = name) on ``hub`` (default: ``hub1``) and stops it at teardown.
- ``nats_client``: the ``connected`` helper: ``async with nats_client(url) as nc``. Test code can
  also import ``connected`` from here.

Agents and controllers for tests: ``agent_config(node, url, directory, zone, **settings)`` (one
volume, fast heartbeats), ``running_agents(configs)`` (started in order, stopped at exit),
``two_agents(hub, leaf_factory, directory)`` (leaves ``node-a`` and ``node-b`` with an agent each,
the event store and task stream ready) and ``controlled_domain(hub, leaf_factory, directory,
policy)`` (a policy applied, a controller, three leaves ``n1``..``n3`` in zones ``z1``..``z3`` with
agents). They import the agent and controller only when called, so loading this plugin stays cheap.

Helpers: ``until(check, what, timeout=60)`` waits for a condition under a generous wall-clock
limit (a guard against hangs on a loaded machine, never a speed check);
``secured_server(directory, users, name)`` starts one hub server (domain ``hub``) whose
accounts are the given generated users (``cim_place.cluster.nats.users``); ``.url(user)`` gives a
client URL with that user's credentials.

Every server is stopped at teardown whether or not the test failed; ``nats_server_children()``
lists the nats-server processes still running under this process (the no-leak check).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from nats.aio.client import Client

from cim_place.cluster.nats.connection import connected
from cim_place.cluster.nats.users import User, render_accounts
from cim_place.local.server_spec import ServerSpec
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub, add_leaf, start_hub, start_single

if TYPE_CHECKING:
    from cim_place.cluster.agent.config import AgentConfig
    from cim_place.cluster.agent.service import Agent
    from cim_place.cluster.controller.service import Controller

__all__ = [
    "NO_SCHEDULED_SCRUB",
    "ClientFactory",
    "LeafFactory",
    "SecuredServer",
    "agent_config",
    "connected",
    "controlled_domain",
    "nats_server_children",
    "running_agents",
    "secured_server",
    "two_agents",
    "until",
]


async def until(
    check: Callable[[], bool], what: str = "the condition", timeout: float = 60.0
) -> None:
    """Wait until ``check()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class LeafFactory(Protocol):
    """Starts a leaf named ``name`` (its JetStream domain too) on ``hub`` (default: ``hub1``)."""

    def __call__(
        self, name: str, *, hub: Hub | None = None, via_proxy: bool = False
    ) -> NatsServer: ...


def nats_server_children(parent: int | None = None) -> list[int]:
    """PIDs of nats-server processes whose parent is ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: "pid (comm) state ppid ..."; comm may contain spaces, so split after ')'.
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if comm == "nats-server" and int(fields[1]) == parent:
            found.append(int(entry.name))
    return sorted(found)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with start_single(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def hub1(tmp_path: Path) -> Iterator[Hub]:
    with start_hub(tmp_path / "hub1", size=1) as hub:
        yield hub


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with start_hub(tmp_path / "hub", size=3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def hub_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with start_hub(tmp_path_factory.mktemp("hub-cluster"), size=3) as cluster:
        yield cluster


@pytest.fixture
def leaf_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeafFactory]:
    leaves: list[NatsServer] = []

    def make(name: str, *, hub: Hub | None = None, via_proxy: bool = False) -> NatsServer:
        target: Hub = hub if hub is not None else request.getfixturevalue("hub1")
        leaf = add_leaf(target, tmp_path / "leaves" / name, name, via_proxy=via_proxy)
        leaves.append(leaf)
        return leaf

    try:
        yield make
    finally:
        for leaf in reversed(leaves):
            leaf.stop()


class ClientFactory(Protocol):
    """``async with nats_client(url) as nc``: a fail-fast client, closed on exit."""

    def __call__(
        self, servers: str | list[str] | None = None, *, name: str = ...
    ) -> AbstractAsyncContextManager[Client]: ...


@pytest.fixture
def nats_client() -> ClientFactory:
    return connected


@dataclass
class SecuredServer:
    """One hub server running the accounts of ``users``; stop it with :meth:`stop`."""

    server: NatsServer
    users: dict[str, User]

    def url(self, user: str) -> str:
        return f"nats://{user}:{self.users[user].password}@127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.server.stop()


def secured_server(directory: Path, users: Sequence[User], name: str) -> SecuredServer:
    """Start a single hub server (JetStream domain ``hub``) with ``users`` as its accounts."""
    spec = ServerSpec(
        server_name=name, store_dir=directory / "js", domain="hub", extra=render_accounts(users)
    )
    server = NatsServer(spec, directory).start().wait_ready()
    return SecuredServer(server, {user.name: user for user in users})


# -- agents and controllers ---------------------------------------------------------------------

NO_SCHEDULED_SCRUB = 24 * 3600.0
"""A ``scrub_interval`` for agents whose scrubs the test asks for: none starts on its own."""


def agent_config(node: str, url: str, directory: Path, zone: str, **settings: Any) -> AgentConfig:
    """A test agent's configuration: volume ``v0`` under ``directory/node``, labels region ``eu``,
    ``zone`` and host ``node``, a heartbeat every 0.5 s and an inventory digest only hourly (none
    during a test); ``settings`` sets further fields (``scrub_interval``, ``http``...)."""
    from cim_place.cluster.agent.config import AgentConfig, VolumeConfig

    return AgentConfig(
        node=node,
        volumes=(VolumeConfig("v0", directory / node / "v0"),),
        servers=(url,),
        labels={"region": "eu", "zone": zone, "host": node},
        heartbeat=0.5,
        inventory=3600,
        **settings,
    )


@asynccontextmanager
async def running_agents(configs: Iterable[AgentConfig]) -> AsyncIterator[dict[str, Agent]]:
    """An agent per configuration (fsync off: a test's data need not survive a power cut), started
    in order, by node id. Every agent in that dict at the end is stopped (1 s grace): a test may
    pop one it stops itself, or add one for the exit to stop."""
    from cim_place.cluster.agent.service import Agent

    agents: dict[str, Agent] = {}
    for config in configs:
        agents[config.node] = Agent(config, fsync="none")
        await agents[config.node].start()
    try:
        yield agents
    finally:
        await asyncio.gather(*(agent.stop(grace=1) for agent in agents.values()))


@asynccontextmanager
async def two_agents(
    hub: Hub, leaf_factory: LeafFactory, directory: Path, **settings: Any
) -> AsyncIterator[tuple[Agent, Agent]]:
    """Leaves ``node-a`` (zone ``z1``) and ``node-b`` (``z2``) on ``hub`` with an agent each
    (``agent_config`` with ``settings``), once the hub has the event store and the task stream
    (1 replica) the agents attach to."""
    from cim_place.cluster.events.store import ensure_event_store
    from cim_place.cluster.nats.connection import jetstream
    from cim_place.cluster.tasks.queue import ensure_task_stream

    leaf_a = leaf_factory("node-a", hub=hub)
    leaf_b = leaf_factory("node-b", hub=hub)
    async with connected(hub.url) as nc:
        js_hub = jetstream(nc, "hub")
        await ensure_event_store(js_hub, replicas=1)
        await ensure_task_stream(js_hub, 1)
    configs = [
        agent_config("node-a", leaf_a.url, directory, "z1", **settings),
        agent_config("node-b", leaf_b.url, directory, "z2", **settings),
    ]
    async with running_agents(configs) as agents:
        yield agents["node-a"], agents["node-b"]


@asynccontextmanager
async def controlled_domain(
    hub: Hub, leaf_factory: LeafFactory, directory: Path, policy: str, **settings: Any
) -> AsyncIterator[tuple[Controller, dict[str, Agent]]]:
    """``policy`` (YAML) applied, a controller (short lease, quick node verdicts, a full pass every
    2 s), then leaves ``n1``..``n3`` on ``hub`` in zones ``z1``..``z3``, each with an agent
    (``agent_config`` with ``settings``), by node id (as ``running_agents`` gives them). The
    controller stops first."""
    from cim_place.cluster.controller.service import Controller, ControllerConfig
    from cim_place.cluster.nats.connection import jetstream
    from cim_place.cluster.state.policies import PolicyStore
    from cim_place.policies.validate import load_text

    async with connected(hub.url) as nc:
        store = await PolicyStore.open(jetstream(nc, "hub"), create=True)
        await store.apply(load_text(policy, "test.yaml"), actor="test")
    controller = Controller(
        ControllerConfig(
            servers=(hub.url,),
            identity="ctl-a",
            lease=3.0,
            late_after=1.5,
            down_after=3.0,
            full_pass_every=2.0,
            summary_every=0.5,
        )
    )
    await controller.start()
    configs = [
        agent_config(f"n{i}", leaf_factory(f"n{i}", hub=hub).url, directory, f"z{i}", **settings)
        for i in range(1, 4)
    ]
    async with running_agents(configs) as agents:
        try:
            yield controller, agents
        finally:
            await controller.stop()
