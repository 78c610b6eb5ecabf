"""The object columns of the controller's projection: slots, interned values, replicas.

This module owns :class:`ObjectColumns`, the storage under
:class:`~cim_place.cluster.controller.projection.Projection`: which CIDs are tracked, each
object's size, times, owner, name and metadata, and where its confirmed replicas are, read one
object at a time (:meth:`ObjectColumns.object`) or by location (:meth:`ObjectColumns.cids_on`).
What changes them (events) is decided in :mod:`cim_place.cluster.controller.projection`.

Memory is the constraint that shapes the layout (the target is at most 100 bytes per tracked
object at three replicas; docs/SCALE.md has the model): objects live in columns (``array`` of
sizes, times, sequences, owner and metadata ids, name offsets, replica location ids) indexed by
a slot number, 32 bits wide while the values fit (a column widens to 64 bits, once, on the first
value that does not); times are whole seconds; names sit in one UTF-8 blob; CIDs and their slots
are held by :class:`~cim_place.cluster.controller.cid_index.CidIndex` (33 bytes per CID plus its
hash table), not as Python objects. Measured: about 90 bytes per object at 1M
(bench/controller_scale.py), where a dict of CIDs cost about 260. Replicas are up to four 16-bit
location ids per slot (more spill into a small side dict); a location id stands for one interned
``(node, volume)`` pair. The node -> CIDs index is that location column itself: the CIDs on a
node are found with one vectorised scan (about 0.1 s at 1M objects, paid only on node changes),
which costs nothing per object, whereas a dict of sets would cost about 100 bytes per object for
three replicas.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cim_place.cluster.controller.cid_index import CidIndex
from cim_place.objectstore.cid import Cid
from cim_place.placement.reconcile_model import Replica

__all__ = ["ObjectColumns", "ObjectView"]

_WIDTH = 4
"""Replica location ids stored inline per object; a fifth and later spill into a side dict."""
_EMPTY = 0
_MAX_LOCATIONS = 0xFFFF
_COMPARED_AT_MOST = 4
"""Locations :meth:`ObjectColumns._slots_with` compares each cell with; more use a table."""


@dataclass(frozen=True, slots=True)
class ObjectView:
    """One tracked object as the reconciler sees it (built on demand, not stored)."""

    cid: Cid
    size: int
    owner: str
    name: str | None
    metadata: Mapping[str, str]
    first_seen: float
    """When the first ObjectStored of this CID was applied (see :meth:`Projection.apply_event`)."""
    sequence: int
    """Stream sequence of the last event applied about this CID (0: none known)."""
    replicas: frozenset[Replica]


class ObjectColumns:
    """Tracked objects in columns indexed by slot (see
    :class:`~cim_place.cluster.controller.projection.Projection`)."""

    def __init__(self) -> None:
        # -- objects, in columns indexed by slot ------------------------------------------------
        # CID -> slot and back, with free-slot reuse (cid_index.py: ~40 bytes per CID where a
        # dict and a list of the CIDs cost ~200).
        self._index = CidIndex()
        # 32-bit columns while the values fit; _widen makes one 64-bit on the first that does
        # not (an object over 4 GiB, a stream past 2**32 events, a name blob over 2 GiB).
        self._size = array("I")
        # Times in whole seconds: a float per object would cost 4 bytes more, and a second is
        # finer than anything decided on them (expiry, the age of a verification).
        self._first_seen = array("I")
        self._sequence = array("I")
        self._owner = array("I")
        self._meta = array("I")
        # Names as UTF-8 in one blob (offset, length; offset -1: no name): a str per object
        # would cost ~60 bytes, the blob costs the name's bytes. A renamed object leaves its old
        # name behind in the blob; renames are rare, so no compaction.
        self._names = bytearray()
        self._name_at = array("i")
        self._name_len = array("H")
        self._rep = array("H")
        self._rep_more: dict[int, list[int]] = {}
        # When each inline replica was last stored (= verified whole), in whole seconds.
        self._rep_at = array("I")
        # -- interning: owners and metadata maps by id, locations by id -------------------------
        self._strings: list[str] = [""]
        self._string_id: dict[str, int] = {"": 0}
        self._metas: list[Mapping[str, str]] = [{}]
        self._meta_id: dict[tuple[tuple[str, str], ...], int] = {(): 0}
        self._locations: list[Replica] = [("", "")]  # id 0 means "no replica"
        self._location_id: dict[Replica, int] = {}

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, cid: object) -> bool:
        return cid in self._index

    def cids(self) -> Iterator[Cid]:
        """Every tracked CID (a snapshot: safe to mutate the projection while iterating)."""
        return iter(self._index.keys())

    def cid_chunks(self, size: int = 4096, start: int = 0) -> Iterator[tuple[int, list[Cid]]]:
        """Every tracked CID, ``size`` slots at a time from slot ``start`` round to it again,
        each chunk listed when it is reached (memory for one chunk, not for every CID), with
        the slot where the next chunk starts (a cursor to resume a walk from). Safe to mutate
        the projection between chunks (a CID added meanwhile in a slot already passed, or
        beyond the slots there were, is missed: its own event marked it)."""
        slots = self._index.slots
        start = start if 0 <= start < slots else 0
        for low, end in ((start, slots), (0, start)):
            for first in range(low, end, size):
                last = min(first + size, end)
                yield (last if last < slots else 0), self._index.keys_at(range(first, last))

    def slot(self, cid: Cid) -> int | None:
        """The slot of ``cid`` (what columns kept elsewhere per object are indexed by)."""
        return self._index.get(cid)

    def keys_at(self, slots: npt.NDArray[np.intp]) -> list[Cid]:
        """The CIDs in ``slots`` (free slots skipped)."""
        return self._index.keys_at(slots)

    def sizes_at(self, slots: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        """The sizes of the objects in ``slots``."""
        view = np.frombuffer(self._size, dtype=np.dtype(f"u{self._size.itemsize}"))
        sizes = view[slots].astype(np.uint64)
        del view  # the array cannot grow while a view of it exists
        return sizes

    def object(self, cid: Cid) -> ObjectView | None:
        """The tracked object ``cid``, or None if no ObjectStored for it was applied."""
        slot = self._index.get(cid)
        if slot is None:
            return None
        name = self._name(slot)
        return ObjectView(
            cid=cid,
            size=self._size[slot],
            owner=self._strings[self._owner[slot]],
            name=name,
            metadata=self._metas[self._meta[slot]],
            first_seen=float(self._first_seen[slot]),
            sequence=self._sequence[slot],
            replicas=frozenset(self._locations[i] for i in self._replica_ids(slot)),
        )

    def size(self, cid: Cid) -> int:
        """Content bytes of ``cid`` (0 if unknown), without building its :class:`ObjectView`."""
        slot = self._index.get(cid)
        return 0 if slot is None else self._size[slot]

    def replicas(self, cid: Cid) -> frozenset[Replica]:
        """Confirmed ``(node, volume)`` replicas of ``cid`` (empty if unknown)."""
        slot = self._index.get(cid)
        if slot is None:
            return frozenset()
        return frozenset(self._locations[i] for i in self._replica_ids(slot))

    def verified_at(self, cid: Cid) -> dict[Replica, float]:
        """When each replica of ``cid`` was last stored whole (replicas beyond the inline four
        have no time)."""
        slot = self._index.get(cid)
        if slot is None:
            return {}
        base = slot * _WIDTH
        return {
            self._locations[location]: float(self._rep_at[base + k])
            for k in range(_WIDTH)
            if (location := self._rep[base + k])
        }

    def cids_on(self, node: str, volume: str | None = None) -> set[Cid]:
        """CIDs with a confirmed replica on ``node`` (on its ``volume`` only, if given)."""
        return self._cids_at(
            [
                i
                for i, (n, v) in enumerate(self._locations)
                if i and n == node and (volume is None or v == volume)
            ]
        )

    def cids_on_nodes(self, nodes: Iterable[str]) -> set[Cid]:
        """CIDs with a confirmed replica on any of ``nodes`` (one scan for them all)."""
        wanted = set(nodes)
        return self._cids_at([i for i, (n, _) in enumerate(self._locations) if i and n in wanted])

    def _cids_at(self, locations: list[int]) -> set[Cid]:
        if not locations:
            return set()
        return set(self._index.keys_at(self._slots_with(locations)))

    # -- internals --------------------------------------------------------------------------------

    def _new_slot(self, slot: int, at: float) -> None:
        # The columns of a slot the index just gave out: reset if reused, else appended.
        if slot < len(self._size):  # a freed slot, reused
            self._size[slot] = 0
            self._first_seen[slot] = _seconds(at)
            self._sequence[slot] = 0
            self._owner[slot] = 0
            self._meta[slot] = 0
        else:
            self._name_at.append(-1)
            self._name_len.append(0)
            self._size.append(0)
            self._first_seen.append(_seconds(at))
            self._sequence.append(0)
            self._owner.append(0)
            self._meta.append(0)
            self._rep.extend(_ZEROS)
            self._rep_at.extend(_NO_TIMES)

    def _name(self, slot: int) -> str | None:
        start = self._name_at[slot]
        if start < 0:
            return None
        return self._names[start : start + self._name_len[slot]].decode()

    def _set_name(self, slot: int, name: str | None) -> None:
        if name is None:
            self._name_at[slot] = -1
            return
        data = name.encode()
        start = self._name_at[slot]
        if start >= 0 and self._names[start : start + self._name_len[slot]] == data:
            return
        try:
            self._name_at[slot] = len(self._names)
        except OverflowError:
            self._widen("_name_at")[slot] = len(self._names)
        try:
            self._name_len[slot] = len(data)
        except OverflowError:
            self._widen("_name_len")[slot] = len(data)
        self._names += data

    def _set_sequence(self, slot: int, sequence: int) -> None:
        try:
            self._sequence[slot] = sequence
        except OverflowError:
            self._widen("_sequence")[slot] = sequence

    def _widen(self, column: str) -> array[int]:
        # Once per column at most: an O(objects) copy into 64-bit values.
        wide = array("q", getattr(self, column))
        setattr(self, column, wide)
        return wide

    def _intern(self, text: str) -> int:
        sid = self._string_id.get(text)
        if sid is None:
            sid = self._string_id[text] = len(self._strings)
            self._strings.append(text)
        return sid

    def _intern_meta(self, metadata: Mapping[str, str]) -> int:
        if not metadata:
            return 0
        items = tuple(metadata.items())
        key = items if len(items) == 1 else tuple(sorted(items))
        mid = self._meta_id.get(key)
        if mid is None:
            mid = self._meta_id[key] = len(self._metas)
            self._metas.append(dict(key))
        return mid

    def _location(self, replica: Replica) -> int:
        lid = self._location_id.get(replica)
        if lid is None:
            lid = len(self._locations)
            if lid > _MAX_LOCATIONS:
                raise OverflowError(
                    f"more than {_MAX_LOCATIONS} (node, volume) pairs seen; the projection "
                    "stores location ids in 16 bits: widen the replica column"
                )
            self._location_id[replica] = lid
            self._locations.append(replica)
        return lid

    def _replica_ids(self, slot: int) -> list[int]:
        base = slot * _WIDTH
        ids = [i for i in self._rep[base : base + _WIDTH] if i]
        more = self._rep_more.get(slot)
        if more:
            ids.extend(more)
        return ids

    def _add_replica(self, slot: int, location: int, at: float = 0.0) -> None:
        rep = self._rep
        base = slot * _WIDTH
        free = -1
        for k in range(base, base + _WIDTH):
            value = rep[k]
            if value == location:
                self._rep_at[k] = _seconds(at)
                return
            if value == _EMPTY and free < 0:
                free = k
        more = self._rep_more.get(slot)
        if more is not None and location in more:
            return
        if free >= 0:
            rep[free] = location
            self._rep_at[free] = _seconds(at)
        elif more is None:
            self._rep_more[slot] = [location]
        else:
            more.append(location)

    def _drop_replica(self, slot: int, location: int) -> None:
        rep = self._rep
        base = slot * _WIDTH
        for k in range(base, base + _WIDTH):
            if rep[k] == location:
                rep[k] = _EMPTY
                return
        more = self._rep_more.get(slot)
        if more is not None and location in more:
            more.remove(location)
            if not more:
                del self._rep_more[slot]

    def _slots_with(self, locations: list[int]) -> list[int]:
        # A transient numpy view of the column (the array cannot grow while a view exists),
        # looked at one replica cell of every row at a time, OR-ed: ``.any(axis=1)`` over rows
        # of 4 cells cost 6-8x more (at 10M objects, 0.2-0.3 s of held loop per volume's
        # inventory digest). A few locations are compared for; more go through a lookup
        # table over all 2**16 ids, one gather per cell, faster than np.isin.
        column = np.frombuffer(self._rep, dtype=np.uint16).reshape(-1, _WIDTH)
        hit = np.zeros(len(column), dtype=bool)
        if len(locations) <= _COMPARED_AT_MOST:
            for location in locations:
                for k in range(_WIDTH):
                    hit |= column[:, k] == location
        else:
            table = np.zeros(_MAX_LOCATIONS + 1, dtype=bool)
            table[locations] = True
            for k in range(_WIDTH):
                hit |= table[column[:, k]]
        slots: list[int] = np.flatnonzero(hit).tolist()
        del column, hit
        if self._rep_more:
            wanted = set(locations)
            extra = [s for s, more in self._rep_more.items() if wanted.intersection(more)]
            if extra:
                return sorted(set(slots).union(extra))
        return slots


_ZEROS = array("H", [_EMPTY] * _WIDTH)
_NO_TIMES = array("I", [0] * _WIDTH)
_SECONDS = 2**32


def _seconds(at: float) -> int:
    """``at`` in whole seconds for a 32-bit column (clamped: times before 1970 or after 2106,
    which validation rejects anyway, and NaN, cannot be stored)."""
    return int(at) if 0 <= at < _SECONDS else (_SECONDS - 1 if at > 0 else 0)
