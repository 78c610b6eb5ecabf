"""The leading controller killed (SIGKILL) mid-reconcile under ``up --controllers 2``: the standby
takes the lease once it expires, reconciling goes on, no copy is dropped twice and no object goes
below ``min`` at any moment sampled (on the volumes themselves, not in the controller's view).

The reconcile that is interrupted is a trim: twelve objects placed with three copies, then a
policy of two. The leader is killed as soon as the first copy is removed, while it has drops in
flight; the event stream then says how many times each copy was removed (once, at most) and the
volumes, sampled all along, say how many copies each object had (never fewer than two).

The killed controller is held down by its supervisor until the standby leads, so that the
takeover measured is the standby's (a restarted controller would otherwise race it for the
expired lease); then it is released, restarts, and stands by.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from cim_place.cluster.events.readers import EventReader
from cim_place.cluster.events.types import (
    EventBodyError,
    ObjectRemoved,
    TaskCompleted,
    parse_event,
)
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import EnvelopeError
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.cluster.state.lease import DEFAULT_LEASE, read_leader
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.policies import PolicyStore
from cim_place.local.credentials import ADMIN
from cim_place.local.domain import CONTROLLER_IDENTITY, LocalDomain
from cim_place.local.supervisor import Supervised
from cim_place.objectstore import cid as cids
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream
from cim_place.policies.validate import load_text
from cim_place.testing import until

pytestmark = [pytest.mark.nats, pytest.mark.chaos, pytest.mark.timeout(900)]

OBJECTS = 12
TRIM = """
name: default
replicas: 2
spread: {domain: host, max_per_domain: 1}
"""


class Watch:
    """What the event stream and the volumes showed while the test ran."""

    def __init__(self, domain: LocalDomain) -> None:
        self.domain = domain
        self.removed: Counter[tuple[str, str, str]] = Counter()
        self.drops_done: Counter[tuple[str, str]] = Counter()
        self.tracked: set[str] = set()
        self.lowest: dict[str, int] = {}
        self.samples = 0

    async def events(self, reader: EventReader) -> None:
        while True:
            for stored in await reader.fetch_stored(timeout=0.5):
                try:
                    event = parse_event(stored.envelope)
                except (EventBodyError, EnvelopeError):
                    continue
                if isinstance(event, ObjectRemoved):
                    key = (cids.to_str(event.root), stored.node, event.volume)
                    self.removed[key] += 1
                elif (
                    isinstance(event, TaskCompleted)
                    and event.action == "drop"
                    and event.root is not None
                ):
                    self.drops_done[(cids.to_str(event.root), event.node)] += 1

    def holders(self) -> Counter[str]:
        count: Counter[str] = Counter()
        for node in self.domain.node_ids():
            with ObjectStore(self.domain.volume_dir(node)) as store:
                for pin in store.pins.list():
                    count[cids.to_str(pin.root)] += 1
        return count

    async def volumes(self) -> None:
        """Sample every volume a few times a second: the fewest copies each object ever had."""
        while True:
            count = await asyncio.to_thread(self.holders)
            for cid in self.tracked:
                self.lowest[cid] = min(self.lowest.get(cid, count[cid]), count[cid])
            self.samples += 1
            await asyncio.sleep(0.2)


def _controller(domain: LocalDomain, identity: str) -> Supervised:
    controllers = [s for s in domain.supervisor.children if s.role == "controller"]
    for index, supervised in enumerate(controllers):
        name = CONTROLLER_IDENTITY if index == 0 else f"{CONTROLLER_IDENTITY}-{index + 1}"
        if name == identity:
            return supervised
    raise AssertionError(f"no controller process has identity {identity}")


async def test_standby_takes_over_mid_reconcile(tmp_path: Path) -> None:
    domain = LocalDomain(
        tmp_path / "domain", leaves=4, zones=3, heartbeat=1.0, controllers=2, http_listen=None
    )
    await domain.start()
    tasks: list[asyncio.Task[None]] = []
    try:
        watch = Watch(domain)
        admin = domain.credentials.url(ADMIN, domain.hub_url)
        async with connected(admin) as nc:
            js = jetstream(nc, HUB_DOMAIN)
            tasks.append(asyncio.create_task(watch.events(EventReader(js))))
            locations = await LocationStore(js).open(create=False)

            async def add(number: int) -> str:
                node = domain.node_ids()[number % len(domain.node_ids())]
                assert await wait_for_holder(nc, node, timeout=30)
                data = chacha_stream(f"takeover-{number}", 64 * 1024).read()
                result = await upload(nc, node, io.BytesIO(data), name=None, owner="")
                return result.cid_text

            async def pinned(cid: str) -> int:
                status = await locations.get(cids.parse(cid))
                return status.pinned if status is not None and status.state == "placed" else -1

            async def wait_pinned(objects: list[str], copies: int, what: str) -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 240
                while [await pinned(c) for c in objects] != [copies] * len(objects):
                    assert loop.time() < deadline, f"timed out waiting for {what}"
                    await asyncio.sleep(0.5)

            objects = [await add(n) for n in range(OBJECTS)]
            await wait_pinned(objects, 3, "three copies of every object")
            watch.tracked.update(objects)
            tasks.append(asyncio.create_task(watch.volumes()))
            await until(lambda: watch.samples > 0, "a first sample of the volumes")

            first = await read_leader(js)
            assert first is not None
            leader = _controller(domain, first.leader_id)
            standby_id = next(
                name
                for name in (CONTROLLER_IDENTITY, f"{CONTROLLER_IDENTITY}-2")
                if name != first.leader_id
            )

            # The trim starts; the leader dies with the first removal, drops still in flight.
            store = await PolicyStore.open(js, create=False)
            await store.apply(load_text(TRIM, "trim.yaml"), actor="takeover test")
            await until(lambda: sum(watch.removed.values()) > 0, "a first copy removed", 240)
            removed_before = sum(watch.removed.values())
            leader.held = True
            pid = leader.child.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()

            # The standby takes the lease once it expired (within one lease, plus its poll).
            takeover = 0.0
            now = None
            loop = asyncio.get_running_loop()
            guard = loop.time() + DEFAULT_LEASE * 10
            while True:
                now = await read_leader(js)
                if now is not None and now.leader_id == standby_id:
                    takeover = time.monotonic() - killed_at
                    break
                assert loop.time() < guard, f"the standby never led (leader: {now})"
                await asyncio.sleep(0.1)
            assert now is not None and now.term > first.term
            leader.held = False  # the killed controller comes back, and stands by

            # Reconciling continues: the trim completes, and a new object is placed.
            await wait_pinned(objects, 2, "two copies of every object after the takeover")
            late = await add(OBJECTS)
            await wait_pinned([late], 2, "the object added after the takeover placed")
            await until(
                lambda: sum(watch.removed.values()) >= OBJECTS, "every removal in the stream", 60
            )
            await asyncio.sleep(2.0)  # late duplicates, if any, would show here
            final = await asyncio.to_thread(watch.holders)
            still = await read_leader(js)

        twice = {key: n for key, n in watch.removed.items() if n > 1}
        assert not twice, f"copies removed more than once: {twice}"
        drops_twice = {key: n for key, n in watch.drops_done.items() if n > 1}
        assert not drops_twice, f"drop tasks completed twice for one copy: {drops_twice}"
        per_object = Counter(cid for cid, _, _ in watch.removed)
        assert all(per_object[cid] == 1 for cid in objects), per_object
        assert all(final[cid] == 2 for cid in objects), final
        below = {cid: n for cid, n in watch.lowest.items() if n < 2}
        assert not below, f"objects below min (2) in a sample of the volumes: {below}"
        assert still is not None and still.leader_id == standby_id
        assert domain.supervisor.children[
            domain.supervisor.children.index(leader)
        ].child.pid not in (None, pid)
        print(
            f"\ntakeover: leader {first.leader_id} (term {first.term}) killed after "
            f"{removed_before} of {OBJECTS} removals; {standby_id} led (term {now.term}) "
            f"{takeover:.1f} s later (lease {DEFAULT_LEASE:g} s); {watch.samples} volume "
            f"samples, fewest copies seen {min(watch.lowest.values())}"
        )
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await domain.stop()
