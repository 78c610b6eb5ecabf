"""The faults of the chaos suite that are more than a signal or a cut link: damage on disk, a full
volume, malformed and forged events, the destruction of every copy of an object.

Each takes the :class:`~cim_place.local.domain.LocalDomain` under test and acts as a real fault
would, from outside the processes: blocks are flipped or deleted in the volume's files, a volume's
capacity is cut to nothing in its agent's configuration (and the agent restarted to read it),
events are published with a leaf's own agent credentials, as a seized node would. What the
domain must do about them is checked by the invariants of :mod:`cim_place.local.chaos`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from pathlib import Path

import yaml

from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.types import NodeJoined, ObjectStored, TaskCompleted
from cim_place.cluster.nats.connection import connected, flushed
from cim_place.cluster.nats.security import agent_user
from cim_place.cluster.nats.subjects import Subjects
from cim_place.local.domain import LocalDomain
from cim_place.objectstore import cid as cids
from cim_place.objectstore import dag
from cim_place.objectstore.cid import RAW, Cid, make_cid
from cim_place.objectstore.store import ObjectStore

FULL_CAPACITY = "1KiB"
"""The capacity a full volume is given: less than any volume of a run already holds."""


def leaf_url(domain: LocalDomain, node: str) -> str:
    for entry in domain.nodes:
        if entry.node == node:
            return entry.url
    raise RuntimeError(f"no node {node}")


def damage_block(domain: LocalDomain, node: str, kind: str, rng: random.Random) -> str:
    """Flip a byte of (``corrupt-block``), or delete (``delete-block``), one block of an object
    the node holds that another node holds whole too; returns what was done, for the run's notes.

    Damage to the only copy of an object not yet copied elsewhere (an add is acknowledged once
    one node stored it) makes its loss certain, which no replication manager can undo: the run
    would report a loss the domain could not have prevented (seed 215673 deleted the one block
    of an object 8 s after its add, while hub and controller kills held up its copies)."""
    with ObjectStore(domain.volume_dir(node)) as store:
        roots = sorted(pin.root for pin in store.pins.list())
        if not roots:
            raise RuntimeError(f"{node} holds nothing yet")
        rng.shuffle(roots)
        others = [other for other in domain.node_ids() if other != node]
        for root in roots:
            if not any(holds_whole(domain, other, root) for other in others):
                continue
            try:
                candidates = [c for c in dag.walk_cids(store.blocks, root) if store.blocks.has(c)]
            except Exception:
                continue  # already damaged here
            if not candidates:
                continue
            block = rng.choice(candidates)
            path = store.blocks.block_path(block)
            if kind == "delete-block":
                path.unlink(missing_ok=True)
            else:
                data = bytearray(path.read_bytes())
                if data:
                    data[len(data) // 2] ^= 0xFF
                    path.write_bytes(bytes(data))
            return f"{kind} on {node}: block {cids.to_str(block)} of {cids.to_str(root)}"
        raise RuntimeError(f"{node} holds no object that another node holds too")


def holds_whole(domain: LocalDomain, node: str, root: Cid) -> bool:
    """Whether ``node``'s volume pins ``root`` and every block of it reads back verified."""
    with ObjectStore(domain.volume_dir(node)) as store:
        if store.pins.get(root) is None:
            return False
        try:
            for _ in store.cat(root):
                pass
        except Exception:
            return False
        return True


def destroy_object(domain: LocalDomain, cid: str) -> None:
    """Delete every block of ``cid``'s holders on every node (an invariant breaker, for the test
    that proves the suite notices)."""
    victim = cids.parse(cid)
    for node in domain.node_ids():
        with ObjectStore(domain.volume_dir(node)) as store:
            if store.pins.get(victim) is None:
                continue
            for block in list(store.blocks.cids()):
                store.blocks.block_path(block).unlink(missing_ok=True)


async def malformed_events(domain: LocalDomain, node: str) -> None:
    """Junk on the node's own event subject, as its agent (the domain is authenticated)."""
    subject = f"{Subjects().prefix}.evt.{node}.ObjectStored"
    async with connected(domain.credentials.url(agent_user(node), leaf_url(domain, node))) as nc:
        for junk in (b"", b"\xff\x00garbage", os.urandom(64)):
            await nc.publish(subject, junk)
        await flushed(nc)


async def forged_events(domain: LocalDomain, node: str, rng: random.Random) -> Cid:
    """Well-formed lies from a seized node, into its own outbox: a copy of content it does not
    hold (the controller's inventory check must catch it), the same claim replayed (the outbox
    stores an envelope id once), and events speaking for another node (rejected outright).
    Returns the CID of the phantom claimed, which must never count as a copy."""
    others = [n for n in domain.node_ids() if n != node] or [node]
    victim = rng.choice(others)
    phantom = make_cid(RAW, f"content {node} never held {uuid.uuid4()}".encode())
    url = domain.credentials.url(agent_user(node), leaf_url(domain, node))
    async with connected(url) as nc:
        publisher = EventPublisher(nc.jetstream(), node)
        claim = await publisher.publish_event(
            ObjectStored(root=phantom, size=1234, blocks=1, volume="v0", owner="mallory")
        )
        await publisher.publish(claim)  # a replay: one stored event, not two
        await publisher.publish_event(
            TaskCompleted(
                task_id=uuid.uuid4().hex,
                action="drop",
                node=victim,
                root=phantom,
                volume="v0",
                attempts=1,
                duration=0.1,
            )
        )
        await publisher.publish_event(
            NodeJoined(node=victim, labels={"zone": "zone-forged"}, started_at=time.time())
        )
    return phantom


def _agent_pid(domain: LocalDomain, node: str) -> int:
    for process in domain.processes():
        if process["role"] == "agent" and process["node"] == node:
            pid = process["pid"]
            if isinstance(pid, int):
                return pid
    raise RuntimeError(f"no agent process for {node}")


async def _restart_agent(domain: LocalDomain, node: str) -> None:
    """SIGTERM the node's agent and wait until its supervisor started another."""
    pid = _agent_pid(domain, node)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        try:
            if _agent_pid(domain, node) != pid:
                return
        except RuntimeError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the agent of {node} was not restarted within 60 s")


async def full_volume(domain: LocalDomain, node: str, lasts: float) -> None:
    """The node's volume is full for ``lasts`` seconds: its agent restarts with a capacity below
    what it holds (every write is refused: uploads, fetches, repairs), then with its own again."""
    path: Path = domain.agent_config_path(node)
    original = path.read_text()
    document = yaml.safe_load(original)
    for volume in document.get("volumes", []):
        volume["capacity"] = FULL_CAPACITY
    try:
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        await _restart_agent(domain, node)
        await asyncio.sleep(lasts)
    finally:
        path.write_text(original)
    await _restart_agent(domain, node)
