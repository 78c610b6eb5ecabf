"""A shard this process no longer leads is forgotten a chunk at a time: its objects' states, set
memberships and status rows go, the other shards' stay, the event loop gets a turn between
chunks, and winning the shard back stops it (pure: numpy states and the status index)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from cim_place.cluster.controller import shards
from cim_place.cluster.controller.object_states import ObjectStates
from cim_place.cluster.controller.shards import forget_shard
from cim_place.cluster.controller.status_index import StatusIndex
from cim_place.cluster.state.cid_shards import shard_of
from cim_place.objectstore.cid import RAW, Cid, cid_of_digest, to_str
from cim_place.placement.status import Location, ObjectStatus

OBJECTS = 300


class Noted:
    """What a sharded process noted about ``OBJECTS`` objects in two shards (slot = position)."""

    def __init__(self) -> None:
        self.cids: list[Cid] = [
            cid_of_digest(RAW, hashlib.sha256(f"object {i}".encode()).digest())
            for i in range(OBJECTS)
        ]
        self.shard = [shard_of(cid, 2) for cid in self.cids]
        self.states = ObjectStates()
        self.index = StatusIndex()
        self.under: set[Cid] = set(self.cids)
        for slot, cid in enumerate(self.cids):
            self.states.note(slot, "placed", self.shard[slot])
            self.index.update(
                ObjectStatus(to_str(cid), "placed", (Location("n1", "v0"),), 1, "default")
            )

    def keys_at(self, slots: npt.NDArray[np.intp]) -> list[Cid]:
        return [self.cids[int(slot)] for slot in slots]

    def of(self, index: int) -> list[Cid]:
        return [cid for cid, shard in zip(self.cids, self.shard, strict=True) if shard == index]

    async def forget(self, index: int, won_back: Callable[[], bool] = lambda: False) -> int:
        return await forget_shard(
            index, self.states, self.keys_at, (self.under,), self.index, won_back=won_back
        )


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "FORGET_CHUNK", 16)


async def test_the_shard_lost_is_forgotten_and_the_other_kept() -> None:
    noted = Noted()
    lost, kept = noted.of(1), noted.of(0)
    assert lost and kept
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    assert await noted.forget(1) == len(lost)
    ticker.cancel()
    assert turns >= -(-len(lost) // 16) - 1  # a turn between chunks
    assert all(noted.index.get(to_str(cid)) is None for cid in lost)
    assert all(noted.index.get(to_str(cid)) is not None for cid in kept)
    assert noted.under == set(kept)
    assert len(noted.states.slots_of_shard(1)) == 0
    assert len(noted.states.slots_of_shard(0)) == len(kept)
    assert noted.states.counts(0)["placed"] == len(kept)


async def test_winning_the_shard_back_stops_the_forgetting() -> None:
    noted = Noted()
    asked = 0

    def won_back() -> bool:
        nonlocal asked
        asked += 1
        return asked > 2  # won back after two chunks

    assert await noted.forget(1, won_back) == 32
    assert len(noted.states.slots_of_shard(1)) == len(noted.of(1)) - 32


async def test_a_slot_given_to_another_shard_meanwhile_is_not_forgotten() -> None:
    noted = Noted()
    lost = [slot for slot in range(OBJECTS) if noted.shard[slot] == 1]
    reused = lost[-1]

    def reuse_a_slot() -> bool:
        # The slot's object left and a new object of the other shard was reconciled there.
        noted.states.note(reused, "placed", 0)
        return False

    assert await noted.forget(1, reuse_a_slot) == len(lost) - 1
    assert noted.states.state(reused) == "placed"
    assert noted.index.get(to_str(noted.cids[reused])) is not None
