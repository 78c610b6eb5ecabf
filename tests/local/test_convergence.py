"""Convergence on real processes: ``up --leaves 5 --zones 3`` under the default policy.

zone-1 holds leaf-1 and leaf-4, zone-2 leaf-2 and leaf-5, zone-3 only leaf-3, which must hold a
copy of every object. Five rounds in a row, each adding 40 new objects of mixed sizes (1 KiB to
3 MiB) round robin through the five agents: every object of every round reaches ``placed`` with
exactly one pinned copy per zone, and the domain summary has no warning. The rounds share one
domain, so the load of earlier rounds is what later placements see (the load cap's case).

Deadlines below bound a hang, they are not speed thresholds; the time each round took is printed
(``-s``) for the record.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.cluster.state.locations import LocationStore
from cim_place.local.credentials import ADMIN
from cim_place.local.domain import LocalDomain
from cim_place.objectstore.testdata import chacha_stream
from cim_place.placement.status import ObjectStatus

pytestmark = pytest.mark.nats

KIB = 1024
MIB = 1024 * KIB
SIZES = (1 * KIB, 3 * MIB, 4 * KIB, 256 * KIB, 1 * MIB, 64 * KIB, 2 * MIB, 12 * KIB)
ROUNDS = 5
OBJECTS = 40
ROUND_DEADLINE = 240.0
ZONES = {"zone-1", "zone-2", "zone-3"}


def one_per_zone(status: ObjectStatus) -> bool:
    pinned = [loc for loc in status.locations if loc.state == "pinned"]
    return (
        status.state == "placed"
        and len(pinned) == 3
        and len(status.locations) == 3
        and {loc.zone for loc in pinned} == ZONES
    )


async def test_forty_mixed_objects_placed_one_copy_per_zone_five_rounds(tmp_path: Path) -> None:
    domain = LocalDomain(tmp_path / "domain", leaves=5, zones=3, heartbeat=1.0)
    await domain.start()
    figures: list[str] = []
    try:
        assert {n.node: n.zone for n in domain.nodes} == {
            "leaf-1": "zone-1",
            "leaf-2": "zone-2",
            "leaf-3": "zone-3",
            "leaf-4": "zone-1",
            "leaf-5": "zone-2",
        }
        async with connected(domain.credentials.url(ADMIN, domain.hub_url)) as nc:
            js = jetstream(nc, HUB_DOMAIN)
            locations = await LocationStore(js).open(create=True)
            for round_ in range(ROUNDS):
                started = time.monotonic()
                cids: list[str] = []
                for i in range(OBJECTS):
                    size = SIZES[i % len(SIZES)]
                    node = domain.nodes[i % len(domain.nodes)].node
                    result = await upload(
                        nc,
                        node,
                        chacha_stream(f"convergence {round_} {i}", size),
                        size=size,
                        name=f"round-{round_}/object-{i}",
                    )
                    cids.append(result.cid_text)
                statuses: dict[str, ObjectStatus | None] = {}
                deadline = time.monotonic() + ROUND_DEADLINE
                while time.monotonic() < deadline:
                    statuses = {cid: await locations.get(cid) for cid in cids}
                    if all(s is not None and one_per_zone(s) for s in statuses.values()):
                        break
                    await asyncio.sleep(0.25)
                not_yet = {
                    cid: (s.state, [(loc.node, loc.state) for loc in s.locations])
                    if s is not None
                    else None
                    for cid, s in statuses.items()
                    if s is None or not one_per_zone(s)
                }
                assert not not_yet, f"round {round_ + 1}: {len(not_yet)} not placed: {not_yet}"
                took = time.monotonic() - started
                figures.append(f"round {round_ + 1}: {OBJECTS} objects placed in {took:.1f}s")
            # The summary is written every second, and a rebalance move started by the
            # controller's full pass may still be under way (copy, then drop).
            summary = await locations.summary()
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline and (
                summary is None or summary.by_state.get("placed") != ROUNDS * OBJECTS
            ):
                await asyncio.sleep(0.25)
                summary = await locations.summary()
            assert summary is not None and summary.warnings == ()
            assert summary.objects == ROUNDS * OBJECTS, summary
            assert summary.by_state.get("placed") == ROUNDS * OBJECTS, summary
    finally:
        print("\n" + "\n".join(figures))
        await domain.stop()
