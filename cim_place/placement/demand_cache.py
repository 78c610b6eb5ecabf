"""The cached copies that demand added, and what a decision about them says (pure values).

:class:`CacheLedger` is the bookkeeping the node budgets need: every cached copy by object and
by node, each node's copies kept in order of last read so eviction (least recently read first)
walks from the front and stops early instead of sorting a node's copies on every add.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from cim_place.objectstore.cid import Cid
from cim_place.placement.model import VolumeId

CopyKey = tuple[Cid, VolumeId]


@dataclass(frozen=True, slots=True)
class CachedCopy:
    """An extra copy that demand added: state ``cached`` in status, never counted towards min."""

    cid: Cid
    volume: VolumeId
    size: int
    last_read: float
    cause: str = ""
    """The demand that caused it, as status and explain show it."""

    @property
    def node(self) -> str:
        return self.volume.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class CacheAdd:
    """Fetch a cached copy of ``cid`` onto ``volume`` for the demand at ``locus``."""

    cid: Cid
    volume: VolumeId
    size: int
    locus: str
    reads: int
    last_read: float
    cause: str


@dataclass(frozen=True, slots=True)
class CacheDrop:
    """Drop the cached copy of ``cid`` on ``volume`` (never a required copy)."""

    cid: Cid
    volume: VolumeId
    reason: str


@dataclass(frozen=True, slots=True)
class DemandDecision:
    """What :func:`cim_place.placement.demand.decide` asks for. ``drop`` may name other objects'
    copies (evictions); ``refresh`` is the object's kept copies with their last read moved;
    ``adopted`` copies now sit on a required volume and leave the cache without being dropped;
    ``skipped`` says which demand got no copy and why (for explain)."""

    add: tuple[CacheAdd, ...] = ()
    drop: tuple[CacheDrop, ...] = ()
    refresh: tuple[CachedCopy, ...] = ()
    adopted: tuple[CachedCopy, ...] = ()
    skipped: tuple[str, ...] = ()


class CacheLedger:
    """Every cached copy in the domain, by object and by node (the budget's bookkeeping)."""

    def __init__(self, copies: Iterable[CachedCopy] = ()) -> None:
        self._by_key: dict[CopyKey, CachedCopy] = {}
        self._by_cid: dict[Cid, set[VolumeId]] = {}
        # Per node, (last read, sequence, key) sorted: eviction walks from the front, and an
        # insert or removal is a bisection plus a move of pointers, not a sort.
        self._order: dict[str, list[tuple[float, int, CopyKey]]] = {}
        self._rank: dict[CopyKey, tuple[float, int]] = {}
        self._sequence = 0
        self._used: dict[str, int] = {}
        for copy in copies:
            self.put(copy)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[CachedCopy]:
        return iter(list(self._by_key.values()))

    def put(self, copy: CachedCopy) -> None:
        """Add or replace a copy."""
        self.remove(copy.cid, copy.volume)
        key = (copy.cid, copy.volume)
        node = copy.node
        self._by_key[key] = copy
        self._by_cid.setdefault(copy.cid, set()).add(copy.volume)
        self._sequence += 1
        rank = (copy.last_read, self._sequence)
        self._rank[key] = rank
        bisect.insort(self._order.setdefault(node, []), (*rank, key))
        self._used[node] = self._used.get(node, 0) + copy.size

    def remove(self, cid: Cid, volume: VolumeId) -> None:
        key = (cid, volume)
        copy = self._by_key.pop(key, None)
        if copy is None:
            return
        self._by_cid[cid].discard(volume)
        if not self._by_cid[cid]:
            del self._by_cid[cid]
        order = self._order[copy.node]
        # Sequences are unique, so (last read, sequence) finds exactly this entry.
        del order[bisect.bisect_left(order, self._rank.pop(key))]
        self._used[copy.node] -= copy.size

    def get(self, cid: Cid, volume: VolumeId) -> CachedCopy | None:
        return self._by_key.get((cid, volume))

    def of_object(self, cid: Cid) -> tuple[CachedCopy, ...]:
        return tuple(self._by_key[(cid, v)] for v in sorted(self._by_cid.get(cid, ())))

    def objects(self) -> set[Cid]:
        return set(self._by_cid)

    def least_recently_read(self, node: str) -> Iterator[CachedCopy]:
        """``node``'s cached copies, least recently read first (ties in the order recorded)."""
        return (self._by_key[k] for _, _, k in self._order.get(node, []))

    def used(self, node: str) -> int:
        """Bytes of cached copies on ``node``."""
        return self._used.get(node, 0)

    def total(self) -> int:
        return sum(self._used.values())

    def apply(self, decision: DemandDecision) -> None:
        """Record a decision as if its tasks had succeeded (the controller does this on the
        events that confirm them; the bench and the tests at once)."""
        for drop in decision.drop:
            self.remove(drop.cid, drop.volume)
        for copy in decision.adopted:
            self.remove(copy.cid, copy.volume)
        for copy in decision.refresh:
            if self.get(copy.cid, copy.volume) != copy:
                self.put(copy)
        for add in decision.add:
            self.put(CachedCopy(add.cid, add.volume, add.size, add.last_read, add.cause))


def required_current(
    copies: Iterable[VolumeId], cached: Collection[VolumeId]
) -> frozenset[VolumeId]:
    """The copies to give the planner as ``current``: every copy except the cached ones, so a
    cached copy is never kept (or counted) as a required one."""
    return frozenset(v for v in copies if v not in cached)
