"""Content follows its readers, on real processes: ``up --leaves 5 --zones 3`` (docs/DEMAND.md).

zone-1 holds leaf-1 and leaf-4, zone-2 leaf-2 and leaf-5, zone-3 leaf-3. The default policy with
a ``demand:`` section (a short ``window`` and ``keep``, so the test ends): an object placed on
leaf-1..3 and read 5 times through leaf-5's gateway gains a ``cached`` copy on leaf-5, with its
cause; reads through leaf-5 are then served from that copy (the agent's report counts them as
local bytes); once nobody reads it for ``keep`` the copy is dropped; the three policy copies
never move and the object stays ``placed`` with 3 of 3 copies all along.

Deadlines bound a hang, they are not speed thresholds; the times measured are printed (``-s``)
for docs/DEMAND.md.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from nats.aio.msg import Msg

from cim_place.cli.placing import place_in_domain
from cim_place.cluster.controller.demand_api import request_demand
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, flushed, jetstream
from cim_place.cluster.nats.envelope import decode
from cim_place.cluster.nats.security import CONTROLLER, READERS_KEY
from cim_place.cluster.nats.subjects import HUB_DOMAIN, Subjects
from cim_place.cluster.state.locations import LocationStore
from cim_place.cluster.state.policies import PolicyStore
from cim_place.local.credentials import ADMIN
from cim_place.local.domain import LocalDomain
from cim_place.objectstore.testdata import chacha_stream
from cim_place.placement.demand_window import DemandReport
from cim_place.placement.status import ObjectStatus
from cim_place.policies.selectors import ObjectFacts
from cim_place.policies.validate import load_text

pytestmark = pytest.mark.nats

SIZE = 300 * 1024
CANDIDATES = 16
KEEP = 20
POLICY = f"""\
name: default
replicas: 3
spread:
  domain: host
  max_per_domain: 1
demand: {{follow: readers, min_reads: 5, window: 10s, max_extra: 2, keep: {KEEP}s, budget: 20%}}
"""
REQUIRED = {"leaf-1", "leaf-2", "leaf-3"}
HANG = 120.0


def pinned(status: ObjectStatus | None) -> set[str]:
    return {loc.node for loc in status.locations if loc.state == "pinned"} if status else set()


def cached(status: ObjectStatus | None) -> list[tuple[str, str]]:
    if status is None:
        return []
    return [(loc.node, loc.cause) for loc in status.locations if loc.state == "cached"]


async def wait_for(
    check: Callable[[], object], what: str, timeout: float = HANG, every: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        await asyncio.sleep(every)


async def test_a_read_object_gains_a_cached_copy_that_goes_when_reads_stop(
    tmp_path: Path,
) -> None:
    domain = LocalDomain(
        tmp_path / "domain", leaves=5, zones=3, heartbeat=1.0, apply_default_policy=False
    )
    await domain.start()
    figures: list[str] = []
    try:
        async with (
            connected(domain.credentials.url(ADMIN, domain.hub_url)) as nc,
            connected(domain.credentials.url(CONTROLLER, domain.hub_url)) as watcher,
        ):
            js = jetstream(nc, HUB_DOMAIN)
            store = await PolicyStore.open(js, create=True)
            await store.apply(load_text(POLICY, "demand.yaml"), actor="test")
            locations = await LocationStore(js).open(create=True)

            # Objects whose three copies land on leaf-1..3 (leaf-3 is zone-3's only node, so
            # the first copy goes there): the planner decides, so try a few and keep one.
            cids = []
            for i in range(CANDIDATES):
                data = chacha_stream(f"demand e2e {i}", SIZE).read()
                # Readable by the gateway's anonymous clients (the site's visitors).
                result = await upload(
                    nc, "leaf-3", io.BytesIO(data), size=SIZE, metadata={READERS_KEY: "*"}
                )
                cids.append(result.cid_text)
            statuses: dict[str, ObjectStatus | None] = {}

            async def all_placed() -> bool:
                for cid in cids:
                    statuses[cid] = await locations.get(cid)
                return all(s is not None and s.state == "placed" for s in statuses.values())

            deadline = time.monotonic() + HANG
            while not await all_placed():
                assert time.monotonic() < deadline, f"not placed: {statuses}"
                await asyncio.sleep(0.25)
            chosen = [cid for cid in cids if pinned(statuses[cid]) == REQUIRED]
            assert chosen, {cid: pinned(s) for cid, s in statuses.items()}
            cid = chosen[0]

            # What leaf-5's agent reports: local and remote bytes served to its clients.
            reports: list[tuple[float, DemandReport]] = []

            async def on_report(msg: Msg) -> None:
                report = DemandReport.from_dict(dict(decode(msg.data).content.body))
                reports.append((time.monotonic(), report))

            await watcher.subscribe(Subjects().demand("leaf-5"), cb=on_report)
            await flushed(watcher)

            # Every status seen from here on: the three policy copies never move.
            seen: list[ObjectStatus] = []
            current: dict[str, ObjectStatus | None] = {"status": statuses[cid]}

            async def watch() -> None:
                while True:
                    status = await locations.get(cid)
                    current["status"] = status
                    if status is not None:
                        seen.append(status)
                    await asyncio.sleep(0.2)

            watching = asyncio.create_task(watch())
            url = f"{domain.http_url('leaf-5')}/ipfs/{cid}"
            try:
                async with aiohttp.ClientSession() as session:

                    async def read() -> None:
                        async with session.get(url) as resp:
                            assert resp.status == 200, await resp.text()
                            assert len(await resp.read()) == SIZE

                    started = time.monotonic()
                    for _ in range(5):
                        await read()
                    await wait_for(lambda: cached(current["status"]), "cached copy on leaf-5")
                    appeared = time.monotonic() - started
                    figures.append(f"cached copy on leaf-5 {appeared:.1f} s after the 1st read")
                    [(node, cause)] = cached(current["status"])
                    assert node == "leaf-5" and "from leaf-5" in cause, cause
                    status = current["status"]
                    assert status is not None and status.state == "placed"
                    assert (status.pinned, status.desired) == (3, 3)
                    # `policy explain` names it, outside the placement.
                    applied = await store.load()
                    found = await place_in_domain(js, cid, ObjectFacts(cid=cid), applied.policy_set)
                    assert found.placing is not None
                    assert found.placing.cached == (("leaf-5/v0", cause),)
                    assert {v.split("/")[0] for v in found.placing.desired} == REQUIRED
                    assert "cached on leaf-5/v0" in found.placing.render()
                    # ... and the leading controller says why, from its window and decision.
                    lines = await request_demand(nc, cid)
                    assert any(line.startswith("cached on leaf-5/v0: ") for line in lines), lines
                    assert any("leaf-5" in line for line in lines if "reads in" in line), lines

                    # Reads through leaf-5 now come from its own copy.
                    after = time.monotonic()
                    for _ in range(3):
                        await read()
                    last_read = time.monotonic()

                    def later() -> list[DemandReport]:
                        return [r for at, r in reports if at > after]

                    await wait_for(
                        lambda: sum(r.local_bytes for r in later()) >= 3 * SIZE, "local reads"
                    )
                    assert sum(r.remote_bytes for r in later()) == 0
                    assert sum(r.remote_bytes for _, r in reports) >= 5 * SIZE

                    # Nobody reads it any more: the cached copy goes after keep.
                    await wait_for(lambda: not cached(current["status"]), "drop of the copy")
                    figures.append(
                        f"cached copy dropped {time.monotonic() - last_read:.1f} s after the "
                        f"last read (keep {KEEP} s)"
                    )
                    # A cached copy leaves the status once its replica is gone (ObjectRemoved).
                    status = current["status"]
                    assert status is not None
                    assert "leaf-5" not in {loc.node for loc in status.locations}, status.locations
            finally:
                watching.cancel()
            for status in seen:
                assert pinned(status) == REQUIRED, status.locations
                assert status.state == "placed" and status.pinned == 3, status
                others = [loc for loc in status.locations if loc.state != "pinned"]
                assert all(loc.node == "leaf-5" and loc.state == "cached" for loc in others), (
                    status.locations
                )
    finally:
        print("\n" + "\n".join(figures))
        await domain.stop()
