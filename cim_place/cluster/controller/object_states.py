"""What this controller process concluded about each object it reconciled, one numpy cell per
projection slot (pure: no NATS, no I/O).

This module owns :class:`ObjectStates`: per slot, the state of the object's last reconcile (for
the summary and the per-shard summaries), the shard it belongs to (sharded controllers) and a
hash of the status this process last wrote for it (so an unchanged status is not written again).

Why columns: a dict of CIDs to states and the status store's dict of key hashes to value hashes
held about 290 bytes per object between them once every object had been reconciled (measured at
20,000 objects: 358 bytes per object of growth over one walk, with the status index); these
columns hold 11 bytes, and the summary is one ``bincount`` instead of a Python loop over every
object each second (at 10 million objects that loop alone took most of a core).

A slot the projection frees and gives to a new object keeps the old object's cells until the new
object is reconciled, which comes at once (a new object is marked): the summary counts that slot
once meanwhile, as it counted the old object, and the new status's hash differs (it names its
CID), so it is written.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cim_place.placement.status import OBJECT_STATES

__all__ = ["NOT_NOTED", "ObjectStates"]

NOT_NOTED = 255
"""The state cell of a slot this process has not reconciled (or has forgotten)."""
_CODE: dict[str, int] = {state: code for code, state in enumerate(OBJECT_STATES)}
_MIN_ROOM = 1024


class ObjectStates:
    """State, shard and written-status hash per projection slot (see the module docstring)."""

    def __init__(self) -> None:
        self._state: npt.NDArray[np.uint8] = np.full(0, NOT_NOTED, dtype=np.uint8)
        self._shard: npt.NDArray[np.uint16] = np.zeros(0, dtype=np.uint16)
        self._written: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return int(self._state.nbytes + self._shard.nbytes + self._written.nbytes)

    def __len__(self) -> int:
        """Slots noted (objects this process reconciled and has not forgotten)."""
        return int(np.count_nonzero(self._state != NOT_NOTED))

    def _room(self, slot: int) -> None:
        have = len(self._state)
        if slot < have:
            return
        size = max(slot + 1, have + have // 2, _MIN_ROOM)
        state = np.full(size, NOT_NOTED, dtype=np.uint8)
        state[:have] = self._state
        shard = np.zeros(size, dtype=np.uint16)
        shard[:have] = self._shard
        written = np.zeros(size, dtype=np.int64)
        written[:have] = self._written
        self._state, self._shard, self._written = state, shard, written

    # -- states -----------------------------------------------------------------------------------

    def note(self, slot: int, state: str, shard: int = 0) -> None:
        """The object in ``slot`` was reconciled to ``state`` (one of OBJECT_STATES)."""
        self._room(slot)
        self._state[slot] = _CODE[state]
        self._shard[slot] = shard

    def state(self, slot: int) -> str | None:
        if slot >= len(self._state) or self._state[slot] == NOT_NOTED:
            return None
        return OBJECT_STATES[int(self._state[slot])]

    def clear(self, slot: int) -> None:
        """Forget the object in ``slot`` (it left the projection)."""
        if slot < len(self._state):
            self._state[slot] = NOT_NOTED
            self._written[slot] = 0

    def counts(self, shard: int | None = None) -> dict[str, int]:
        """Objects per state, of every noted slot or of ``shard``'s."""
        states = self._state if shard is None else self._state[self._shard == shard]
        counted = np.bincount(states, minlength=NOT_NOTED + 1)
        return {state: int(counted[code]) for state, code in _CODE.items()}

    def counts_by_shard(self, noted: npt.NDArray[np.intp], shards: int) -> list[dict[str, int]]:
        """Objects per state of each of ``shards`` shards, over ``noted`` (the noted slots):
        one ``bincount`` of (shard, state) pairs, not a pass over every slot per shard."""
        width = NOT_NOTED + 1
        pairs = self._shard[noted].astype(np.intp) * width + self._state[noted]
        table = np.bincount(pairs, minlength=shards * width).reshape(-1, width)
        return [{state: int(row[code]) for state, code in _CODE.items()} for row in table[:shards]]

    def slots_of_shard(self, shard: int) -> npt.NDArray[np.intp]:
        """The noted slots of ``shard``."""
        return np.flatnonzero((self._state != NOT_NOTED) & (self._shard == shard))

    def of_shard(self, slots: npt.NDArray[np.intp], shard: int) -> npt.NDArray[np.intp]:
        """Those of ``slots`` noted and of ``shard``."""
        kept: npt.NDArray[np.intp] = slots[
            (self._state[slots] != NOT_NOTED) & (self._shard[slots] == shard)
        ]
        return kept

    def shards_of(self, slots: npt.NDArray[np.intp]) -> npt.NDArray[np.uint16]:
        return self._shard[slots]

    def noted_slots(self) -> npt.NDArray[np.intp]:
        return np.flatnonzero(self._state != NOT_NOTED)

    def clear_slots(self, slots: npt.NDArray[np.intp]) -> None:
        self._state[slots] = NOT_NOTED
        self._written[slots] = 0

    # -- the status last written ------------------------------------------------------------------

    def written(self, slot: int) -> int:
        """The hash of the status this process last wrote for ``slot`` (0: none)."""
        return int(self._written[slot]) if slot < len(self._written) else 0

    def set_written(self, slot: int, value: int) -> None:
        self._room(slot)
        self._written[slot] = value

    def forget_written(self) -> None:
        """Every status is written again at its next reconcile (a new term: what the KV holds
        may be another leader's)."""
        self._written[:] = 0
