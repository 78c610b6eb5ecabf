"""The full pass's rebalance check looks at a bounded number of objects per pass, resumes where
the last pass stopped, and gives the event loop a turn between chunks; a walk of every object
that lasts longer than the full pass is reported (pure: the controller of
``test_reconcile_window`` with an in-memory task queue and status store)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import pytest

from cim_place.cluster.controller import periodic, reconcile_loop
from cim_place.cluster.controller.service import Controller
from cim_place.objectstore.cid import Cid
from cim_place.placement.eligibility import Eligibility
from cim_place.placement.model import NodeMap
from cim_place.placement.reconcile_model import ReconcileResult
from tests.cluster.controller.test_reconcile_window import (
    OBJECTS,
    UNLIMITED,
    SlowQueue,
    controller_with,
)


def noting(controller: Controller) -> tuple[list[list[Cid]], list[Cid]]:
    """Record the chunks the rebalance check looks at and the objects it moves (the moves
    themselves are not made, so every object stays a candidate)."""
    looked: list[list[Cid]] = []
    moved: list[Cid] = []
    moves = controller._rebalance_moves

    def rebalance_moves(
        cids: list[Cid], node_map: NodeMap, limit: int, rules: dict[str, Eligibility]
    ) -> list[Cid]:
        if cids:  # free slots make empty chunks
            looked.append(list(cids))
        return moves(cids, node_map, limit, rules)

    async def reconcile_one(cid: Cid, *, rebalance: bool = False) -> ReconcileResult | None:
        assert rebalance
        moved.append(cid)
        return None

    controller._rebalance_moves = rebalance_moves  # type: ignore[method-assign]
    controller.reconcile_one = reconcile_one  # type: ignore[method-assign]
    return looked, moved


async def test_each_pass_looks_at_the_next_objects_and_goes_round() -> None:
    config = replace(UNLIMITED, rebalance_scan_per_pass=40, rebalance_per_pass=1000)
    controller, cids = controller_with(config, SlowQueue())
    looked, moved = noting(controller)
    scanned = controller.metrics.rebalance_scanned
    passes = []
    for _ in range(5):
        before, first = len(moved), len(looked)
        await controller.rebalance(time.time())
        passes.append([cid for chunk in looked[first:] for cid in chunk])
        assert set(moved[before:]) <= set(passes[-1])
    # About 40 objects a pass (chunks of 40 slots, until a chunk reaches 40: the fourth pass
    # takes the last 8 objects and goes round to the first 40), each pass going on from the
    # last: every object once per round.
    assert [len(objects) for objects in passes] == [40, 40, 40, 48, 40]
    assert [cid for objects in passes for cid in objects] == (cids * 2)[:208]
    assert moved, "objects stored once on n0 are never candidates"
    assert scanned._value.get() == 208


async def test_a_chunk_cut_short_by_the_limit_is_looked_at_again() -> None:
    config = replace(UNLIMITED, rebalance_scan_per_pass=40, rebalance_per_pass=3)
    controller, cids = controller_with(config, SlowQueue())
    looked, moved = noting(controller)
    assert await controller.rebalance(time.time()) == 3
    assert len(moved) == 3
    assert controller._rebalance_cursor == 0
    await controller.rebalance(time.time())
    assert looked == [cids[:40], cids[:40]]


async def test_the_event_loop_runs_between_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(periodic, "REBALANCE_CHUNK", 16)
    config = replace(UNLIMITED, rebalance_scan_per_pass=OBJECTS, rebalance_per_pass=1000)
    controller, _ = controller_with(config, SlowQueue())
    looked, _ = noting(controller)
    seen: list[int] = []

    async def tick() -> None:
        while True:
            seen.append(len(looked))
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    await controller.rebalance(time.time())
    ticker.cancel()
    assert len(looked) == OBJECTS // 16
    assert set(range(1, OBJECTS // 16)) <= set(seen)  # a turn after each chunk


async def test_a_pass_stops_when_leadership_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(periodic, "REBALANCE_CHUNK", 16)
    config = replace(UNLIMITED, rebalance_scan_per_pass=OBJECTS, rebalance_per_pass=1000)
    controller, cids = controller_with(config, SlowQueue())
    looked, _ = noting(controller)
    moves = controller._rebalance_moves

    def deposed_on_the_way(
        cids: list[Cid], node_map: NodeMap, limit: int, rules: dict[str, Eligibility]
    ) -> list[Cid]:
        controller._acting = False
        return moves(cids, node_map, limit, rules)

    controller._rebalance_moves = deposed_on_the_way  # type: ignore[method-assign]
    await controller.rebalance(time.time())
    assert looked == [cids[:16]]
    assert controller._rebalance_cursor == 16  # the next leader's pass goes on from there


async def test_a_walk_longer_than_the_full_pass_is_reported_once_an_hour(
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller, _ = controller_with(replace(UNLIMITED, full_pass_every=3600.0), SlowQueue())
    caplog.set_level(logging.WARNING, logger="cim_place.cluster.controller.reconcile_loop")
    assert await controller._timed_walk()
    took = controller.metrics.walk_seconds._value.get()
    assert took > 0
    assert not caplog.records  # shorter than the full pass: nothing to say
    controller.config = replace(controller.config, full_pass_every=took / 1000)
    assert await controller._timed_walk()
    assert await controller._timed_walk()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned  # once an hour, not at every walk
    assert f"walk of every object ({OBJECTS})" in warned[0]
    assert "set full_pass to at least" in warned[0]
    controller._walk_warned -= reconcile_loop.WALK_WARN_EVERY
    assert await controller._timed_walk()
    assert len(caplog.records) == 2


async def test_full_passes_space_the_walks_they_ask_for_by_their_length() -> None:
    controller, _ = controller_with(replace(UNLIMITED, full_pass_every=3600.0), SlowQueue())
    assert controller.walk_wanted(time.monotonic())  # none yet
    controller.mark_all()
    assert not controller.walk_wanted(time.monotonic())  # one is asked for already
    controller._all_dirty = False
    walked: list[bool] = []

    async def walk_all() -> bool:
        # Asked in the middle of a walk, the full pass does not ask for another one.
        walked.append(controller.walk_wanted(time.monotonic()))
        await asyncio.sleep(0.05)
        return True

    controller._walk_all = walk_all  # type: ignore[method-assign]
    assert await controller._timed_walk()
    assert walked == [False]
    took, ended = controller._walk_took, controller._walk_ended
    assert took >= 0.05
    assert not controller.walk_wanted(ended + took / 2)  # as long idle as the walk lasted
    assert controller.walk_wanted(ended + took)
    # A full pass: an hour after an hour-long walk, and a moment after it.
    controller._walk_took, controller._walk_ended = 3600.0, time.monotonic() - 3600.0
    await controller.full_pass()
    assert controller._all_dirty
    controller._all_dirty = False
    controller._walk_ended = time.monotonic()
    await controller.full_pass()
    assert not controller._all_dirty
