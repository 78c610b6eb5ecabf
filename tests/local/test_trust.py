"""Control-plane trust on a whole authenticated domain (`cim-place up`'s LocalDomain, real NATS).

- a leaf's credentials cannot publish another node's events (the server refuses them);
- a node that forges its own ``ObjectStored`` for content it does not hold is caught by the
  controller's next inventory check, and a controller restart does not believe it again;
- 10,000 mutated events and heartbeats from a seized leaf's credentials are rejected and
  counted while the controller keeps placing new objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client

from cim_place.cluster.controller.inventory import INVENTORY_BUCKET
from cim_place.cluster.events.publisher import EventPublisher
from cim_place.cluster.events.types import (
    InventoryDigest,
    NodeJoined,
    ObjectRemoved,
    ObjectStored,
    TaskCompleted,
    TaskFailed,
    event_envelope,
)
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats import kv
from cim_place.cluster.nats.connection import connect, jetstream
from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.cluster.nats.security import CONTROLLER, agent_user, client_options
from cim_place.cluster.state.locations import LocationStore
from cim_place.local.credentials import ADMIN
from cim_place.local.domain import LocalDomain
from cim_place.objectstore.cid import RAW, Cid, make_cid, to_str
from cim_place.objectstore.dagcbor import Link
from cim_place.placement.status import Location, ObjectStatus

pytestmark = pytest.mark.nats

_POLL = 0.1
_TRIES = 600  # polls of _POLL seconds: a bound on waiting, not a speed requirement


@pytest.fixture
async def domain(tmp_path: Path) -> AsyncIterator[LocalDomain]:
    local = LocalDomain(tmp_path / "domain", leaves=4, zones=3, heartbeat=1.0, inventory=1)
    await local.start()
    try:
        yield local
    finally:
        await local.stop()


async def _as(domain: LocalDomain, user: str, url: str, errors: list[str] | None = None) -> Client:
    """A plain nats-py client as ``user`` (its permission errors collected in ``errors``)."""
    full = domain.credentials.url(user, url)

    async def on_error(error: Exception) -> None:
        if errors is not None:
            errors.append(str(error))

    return await nats.connect(
        full, error_cb=on_error, allow_reconnect=False, **client_options(full)
    )


async def _status(js: object, cid: Cid) -> ObjectStatus | None:
    store = await LocationStore(js).open(create=False)  # type: ignore[arg-type]
    return await store.get(cid)


async def _placed(js: object, cid: Cid) -> ObjectStatus:
    found = None
    for _ in range(_TRIES):
        found = await _status(js, cid)
        if found is not None and found.state == "placed" and found.pinned == found.desired:
            return found
        await asyncio.sleep(_POLL)
    raise AssertionError(f"{to_str(cid)} not placed: {found}")


def _pinned_on(status: ObjectStatus | None, node: str) -> bool:
    return status is not None and any(
        loc.node == node and loc.state == "pinned" for loc in status.locations
    )


async def test_a_leaf_cannot_publish_another_nodes_events(domain: LocalDomain) -> None:
    errors: list[str] = []
    leaf_1 = domain.nodes[0]
    agent = await _as(domain, agent_user("leaf-1"), leaf_1.url, errors)
    try:
        await agent.publish("cim.place.evt.leaf-2.ObjectStored", b"forged")
        await agent.flush()
        for _ in range(_TRIES):
            if errors:
                break
            await asyncio.sleep(_POLL)
        assert any("permissions violation" in e.lower() and "evt.leaf-2" in e for e in errors)
    finally:
        await agent.close()
    # Nor through the hub: the agent's user exists only on its own leaf.
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await _as(domain, agent_user("leaf-1"), domain.hub_url)


async def test_a_forged_claim_is_caught_and_not_believed_after_a_restart(
    domain: LocalDomain,
) -> None:
    admin = await connect(domain.credentials.url(ADMIN, domain.hub_url))
    forger = await connect(domain.credentials.url(agent_user("leaf-1"), domain.nodes[0].url))
    try:
        js = jetstream(admin, "hub")
        real = await upload(admin, "leaf-1", io.BytesIO(os.urandom(50_000)))
        await _placed(js, real.cid)
        # leaf-1 claims an object it never stored: a well-formed event on its own subject.
        phantom = make_cid(RAW, b"content leaf-1 does not hold")
        publisher = EventPublisher(forger.jetstream(), "leaf-1")
        await publisher.publish_event(
            ObjectStored(root=phantom, size=1234, blocks=1, volume="v0", owner="mallory")
        )
        # The claim may be believed for a moment (the status shows leaf-1 pinned) or caught
        # before a status was written: the proof that it was caught is the inventory check's
        # record of it, after which no status shows the copy.
        records = await js.key_value(INVENTORY_BUCKET)
        phantom_text = to_str(phantom)
        for _ in range(_TRIES):
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await records.get("leaf-1.v0")
                if entry.value and phantom_text in json.loads(entry.value):
                    break
            await asyncio.sleep(_POLL)
        else:
            raise AssertionError("the inventory check did not catch the forged claim")
        for _ in range(_TRIES):
            if not _pinned_on(await _status(js, phantom), "leaf-1"):
                break
            await asyncio.sleep(_POLL)
        else:
            raise AssertionError("the forged copy stays in the status after the check")

        # A leader stopped between its check and its next write of the phantom's status left
        # the status it wrote while it believed the claim (chaos seed 606): written back here
        # as that leader had it. The restarted controller must remove it.
        as_controller = await connect(domain.credentials.url(CONTROLLER, domain.hub_url))
        try:
            stale = await LocationStore(jetstream(as_controller, "hub")).open(create=False)
            await stale.put(
                ObjectStatus(
                    cid=phantom_text,
                    state="degraded",
                    locations=(Location("leaf-1", "v0", "zone-1"),),
                    desired=3,
                    owner="mallory",
                    size=1234,
                )
            )
        finally:
            await as_controller.close()
        assert _pinned_on(await _status(js, phantom), "leaf-1")
        store = await LocationStore(js).open(create=False)

        # A restarted controller replays the forgery from the event store: it must not believe it.
        controller = next(p for p in domain.processes() if p["role"] == "controller")
        assert isinstance(controller["pid"], int)
        restarted_at = time.time()
        os.kill(controller["pid"], signal.SIGKILL)
        # The new controller disbelieves the replayed claim, so the phantom is not tracked at all
        # (or, were it, lost: no confirmed copy), and its stale status goes. Had it believed the
        # claim, leaf-1 would hold a copy and the phantom be degraded or progressing.
        for _ in range(_TRIES):
            summary = await store.summary()
            if (
                not _pinned_on(await _status(js, phantom), "leaf-1")
                and summary is not None
                and summary.updated_at > restarted_at + 1
                and summary.by_state.get("placed") == 1
                and summary.objects - summary.by_state.get("lost", 0) == 1
            ):
                break
            await asyncio.sleep(_POLL)
        else:
            raise AssertionError(f"after the restart: {summary}")
        assert (await _placed(js, real.cid)).pinned == 3
    finally:
        await forger.close()
        await admin.close()


# -- fuzz ------------------------------------------------------------------------------------------

_BAD_VALUES: list[object] = [
    -5,
    -1,
    1 << 63,
    "x" * 5000,
    None,
    True,
    [1, 2],
    {"a": 1},
    b"\x00\x01",
    Link(b"\x01\x55\x12\x20abc"),
    "",
    3.5,
]


def _valid_events(node: str, rng: random.Random) -> list[Envelope]:
    root = make_cid(RAW, rng.randbytes(16))
    events = [
        ObjectStored(root=root, size=10, blocks=1, volume="v0", owner="x"),
        ObjectRemoved(root=root, size=10, blocks=1, volume="v0", owner="x"),
        TaskCompleted(
            task_id="t", action="fetch", node=node, root=root, volume="v0", attempts=1, duration=1
        ),
        TaskFailed(
            task_id="t",
            action="fetch",
            node=node,
            root=root,
            volume="v0",
            attempts=1,
            reason="r",
            permanent=False,
        ),
        InventoryDigest(volume="v0", pins=1, size=1, digest=b"\0" * 32, taken_at=time.time()),
        NodeJoined(node=node, volumes=("v0",)),
    ]
    return [event_envelope(e, owner=node) for e in events]


def _mutate(envelope: Envelope, node: str, rng: random.Random) -> Envelope | None:
    """An envelope made invalid in one way (None: raw garbage instead)."""
    body = dict(envelope.content.body)
    choice = rng.randrange(10)
    if choice == 0:
        return None
    if choice == 1:
        return Envelope.new(Content("event", rng.choice(["Nope", "", "x" * 300]), body), owner=node)
    if choice == 2 and "node" in body:
        body["node"] = rng.choice(["leaf-2", "other", "a.b", ""])
    elif choice == 3 and body:
        del body[rng.choice(sorted(body))]
    else:
        key = rng.choice(sorted(body))
        body[key] = rng.choice(_BAD_VALUES)
        if key in ("name", "owner") and isinstance(body[key], str) and len(str(body[key])) < 5000:
            body[key] = "y" * 5000  # still a string: too long, not merely another value
        if key == "metadata":
            body[key] = {str(i): "v" for i in range(200)}
    return Envelope.new(Content("event", envelope.content.type, body), owner=node)


def _junk_heartbeat(node: str, rng: random.Random) -> bytes:
    record = {
        "node": node,
        "labels": {"zone": "zone-1", "host": node},
        "tags": [],
        "volumes": [{"name": "v0", "capacity": 1 << 30, "used": 0, "free": 1 << 30}],
        "version": "x",
        "started_at": time.time(),
        "heartbeat_at": time.time(),
    }
    choice = rng.randrange(8)
    volume = record["volumes"][0]  # type: ignore[index]
    if choice == 0:
        volume["capacity"] = -5
    elif choice == 1:
        volume["capacity"] = math.inf
    elif choice == 2:
        volume["free"] = math.nan
    elif choice == 3:
        record["node"] = "leaf-1"
    elif choice == 4:
        record["labels"] = {str(i): "z" * 300 for i in range(100)}
    elif choice == 5:
        record["heartbeat_at"] = time.time() + 10 * 86_400
    elif choice == 6:
        return rng.randbytes(rng.randrange(1, 64))
    else:
        record["volumes"] = "many"
    return json.dumps(record).encode()


async def test_junk_is_rejected_and_placement_goes_on(domain: LocalDomain) -> None:
    """A seized leaf-4 (zone-1, beside leaf-1) throws 10,000 mutated events and heartbeats."""
    rng = random.Random(15)
    node = "leaf-4"
    placing: list[asyncio.Task[ObjectStatus]] = []
    admin = await connect(domain.credentials.url(ADMIN, domain.hub_url))
    seized = await connect(domain.credentials.url(agent_user(node), domain.nodes[3].url))
    try:
        js = jetstream(admin, "hub")
        js_leaf = seized.jetstream()
        nodes = await kv.ensure_bucket(jetstream(seized, "hub"), kv.NODES)
        publisher = EventPublisher(js_leaf, node)
        total, rounds, batch = 10_000, 5, 50
        for round_ in range(rounds):
            for _ in range(total // rounds // batch):
                # A batch of publishes in flight at once: the leaf's stream acks them in order.
                sends = []
                for _ in range(batch):
                    if rng.randrange(10) == 0:
                        await nodes.put(node, _junk_heartbeat(node, rng))
                        continue
                    mutated = _mutate(rng.choice(_valid_events(node, rng)), node, rng)
                    try:
                        if mutated is None:
                            raise ValueError("garbage")
                        payload = mutated.encode()
                    except Exception:
                        payload = rng.randbytes(rng.randrange(1, 200))
                    subject = f"cim.place.evt.{node}.Junk"
                    if mutated is not None and mutated.content.type.isalnum():
                        subject = publisher.subject_of(mutated)
                    sends.append(js_leaf.publish(subject, payload, stream=publisher.stream))
                await asyncio.gather(*sends)
            # Placement goes on throughout: an object added between the volleys (and waited for
            # while the next volleys go in) reaches its three copies.
            added = await upload(admin, "leaf-2", io.BytesIO(rng.randbytes(4096 + round_)))
            placing.append(asyncio.create_task(_placed(js, added.cid)))
        await asyncio.gather(*placing)
        store = await LocationStore(js).open(create=False)
        summary = None
        for _ in range(_TRIES):
            summary = await store.summary()
            if summary is not None and summary.rejected_events >= total // 2:
                break
            await asyncio.sleep(_POLL)
        assert summary is not None and summary.rejected_events >= total // 2, summary
    finally:
        for task in placing:
            task.cancel()
        await seized.close()
        await admin.close()
