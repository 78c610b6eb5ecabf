"""One sorted run of the status index: rows in numpy columns ordered by CID text (pure).

:class:`Columns` holds what a row of ``cim-place status`` shows as codes (state, policy number,
copy counts, size, name number, node ids) beside its CID key (``S<width>``); the index
(:mod:`cim_place.cluster.controller.status_index`) keeps two runs, a large one and a small one,
and owns the tables that turn the codes back into text. A run finds a key by binary search,
marks a removed row dead in place, filters its rows after a cursor in growing vectorised chunks
(:meth:`Columns.scan`), and is merged with another run into a new one (:meth:`Columns.merged`,
one ``np.insert`` per column; dead rows are dropped on the way), or a slice at a time
(:class:`Merge`) when the copy is too large to make in one call on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DEAD", "WIDE", "Columns", "Filter", "Merge", "Values"]

DEAD = 255
"""The state code of a removed row (dropped at the run's next merge)."""
WIDE = 4
"""Node ids kept inline per row; the index keeps more in a side dict keyed by CID."""
Values = tuple[int, int, int, int, int, int, int, tuple[int, ...]]
"""A row's codes: state, policy, pinned, desired, damaged, size, name, node ids."""
_FIRST_CHUNK = 4096
_MAX_CHUNK = 1 << 18
_Positions = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Filter:
    """A page's filters as codes (None / 0: not filtered); ``names`` is a table by name number."""

    state: int | None = None
    policy: int | None = None
    node: int = 0
    names: npt.NDArray[np.bool_] | None = None


class Columns:
    """Rows sorted by key; see the module docstring. Positions are valid until the next merge."""

    def __init__(self, *columns: npt.NDArray[Any]) -> None:
        """A run of ``columns``, in the order of :meth:`columns`."""
        (
            self.keys,
            self.state,
            self.policy,
            self.pinned,
            self.desired,
            self.damaged,
            self.size,
            self.name,
            self.nodes,
        ) = columns
        self.dead = int(np.count_nonzero(self.state == DEAD))

    @classmethod
    def of(cls, items: list[tuple[bytes, Values]]) -> Columns:
        """A run of ``items``, which are sorted by key."""
        width = max((len(key) for key, _ in items), default=1)
        values = list(zip(*(v for _, v in items), strict=True)) or [()] * 8
        nodes = np.zeros((len(items), WIDE), dtype=np.uint16)
        for row, ids in enumerate(values[7]):
            nodes[row, : min(WIDE, len(ids))] = ids[:WIDE]
        return cls(
            np.array([key for key, _ in items], dtype=f"S{width}"),
            np.array(values[0], dtype=np.uint8),
            np.array(values[1], dtype=np.uint16),
            np.array(values[2], dtype=np.uint8),
            np.array(values[3], dtype=np.uint8),
            np.array(values[4], dtype=np.uint8),
            np.array(values[5], dtype=np.int64),
            np.array(values[6], dtype=np.uint32),
            nodes,
        )

    def columns(self) -> tuple[npt.NDArray[Any], ...]:
        """Every column: keys, state, policy, pinned, desired, damaged, size, name, nodes."""
        return (
            self.keys,
            self.state,
            self.policy,
            self.pinned,
            self.desired,
            self.damaged,
            self.size,
            self.name,
            self.nodes,
        )

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def live(self) -> int:
        return len(self.keys) - self.dead

    def find(self, key: bytes) -> int:
        """The position of ``key`` (dead or alive), or -1."""
        keys = self.keys
        if not len(keys) or len(key) > keys.dtype.itemsize:
            return -1
        pos = int(np.searchsorted(keys, key))
        return pos if pos < len(keys) and keys[pos] == key else -1

    def set(self, pos: int, values: Values) -> None:
        """Write ``values`` into the row at ``pos`` (bringing a dead row back)."""
        if self.state[pos] == DEAD:
            self.dead -= 1
        state, policy, pinned, desired, damaged, size, name, nodes = values
        self.state[pos] = state
        self.policy[pos] = policy
        self.pinned[pos] = pinned
        self.desired[pos] = desired
        self.damaged[pos] = damaged
        self.size[pos] = size
        self.name[pos] = name
        self.nodes[pos] = (*nodes[:WIDE], *([0] * (WIDE - len(nodes[:WIDE]))))

    def kill(self, pos: int) -> None:
        """Mark the row at ``pos`` dead and clear its name number (the caller drops the name)."""
        if self.state[pos] != DEAD:
            self.state[pos] = DEAD
            self.name[pos] = 0
            self.dead += 1

    def scan(
        self, after: bytes | None, where: Filter, want: int, spilled: _Positions | None
    ) -> list[int]:
        """Positions of the first ``want`` live rows after ``after`` that pass ``where``.

        ``spilled``: positions whose spilled node ids (beyond :data:`WIDE`) hold ``where.node``.
        """
        keys = self.keys
        pos = 0 if after is None else int(np.searchsorted(keys, after, side="right"))
        state, policy, node, names = where.state, where.policy, where.node, where.names
        found: list[int] = []
        chunk = _FIRST_CHUNK
        while pos < len(keys) and len(found) < want:
            end = min(len(keys), pos + chunk)
            # The first filter runs over the chunk; the others only over the rows it kept (a
            # gather each), so a rare combination costs one compare per row, not four.
            if state is not None:
                hits = np.flatnonzero(self.state[pos:end] == state) + pos
            elif policy is not None:
                hits = np.flatnonzero(self.policy[pos:end] == policy) + pos
                hits = hits[self.state[hits] != DEAD]
            elif names is not None:  # a dead row has no name: the table excludes it
                hits = np.flatnonzero(names[self.name[pos:end]]) + pos
            else:
                hits = np.flatnonzero(self.state[pos:end] != DEAD) + pos
            if policy is not None and state is not None:
                hits = hits[self.policy[hits] == policy]
            if names is not None and (state is not None or policy is not None):
                hits = hits[names[self.name[hits]]]
            if node:
                on = (self.nodes[hits] == node).any(axis=1)
                if spilled is not None:
                    on |= np.isin(hits, spilled)
                hits = hits[on]
            found.extend(hits[: want - len(found)].tolist())
            pos = end
            chunk = min(chunk * 4, _MAX_CHUNK)
        return found

    def gathered(self, positions: Iterable[int]) -> Iterable[tuple[bytes, Values]]:
        """The rows at ``positions`` (one gather per column, not a numpy scalar per field);
        node ids are the inline ones, with zeros left in."""
        at = np.fromiter(positions, dtype=np.int64)
        return zip(
            self.keys[at].tolist(),
            zip(
                self.state[at].tolist(),
                self.policy[at].tolist(),
                self.pinned[at].tolist(),
                self.desired[at].tolist(),
                self.damaged[at].tolist(),
                self.size[at].tolist(),
                self.name[at].tolist(),
                map(tuple, self.nodes[at].tolist()),
                strict=True,
            ),
            strict=True,
        )

    def named(self) -> _Positions:
        """Positions of the rows that hold a name."""
        return np.flatnonzero(self.name != 0)

    def merged(self, other: Columns) -> Columns:
        """A run of the live rows of both runs (a key lives in one run only).

        Costs a copy of both runs: the index merges its small run into the large one only when
        the small one has grown to a share of the large one, so the copies stay linear overall.
        """
        run, more = self.compacted(), other.compacted()
        if not len(more):
            return run
        if not len(run):
            return more
        width = f"S{max(run.keys.dtype.itemsize, more.keys.dtype.itemsize)}"
        keys, new = run.keys.astype(width, copy=False), more.keys.astype(width, copy=False)
        at = np.searchsorted(keys, new)
        return Columns(
            np.insert(keys, at, new),
            *(
                np.insert(a, at, b, axis=0)
                for a, b in zip(run.columns()[1:], more.columns()[1:], strict=True)
            ),
        )

    def compacted(self) -> Columns:
        """This run without its dead rows (itself when none is dead)."""
        if not self.dead:
            return self
        alive = self.state != DEAD
        return Columns(*(column[alive] for column in self.columns()))


class Merge:
    """The merge of ``small`` into ``big`` made a slice of ``big`` at a time (:meth:`step`).

    The arrays of the result are allocated once, for every row of both runs; each step copies
    the live rows of the next slice of ``big`` and of the rows of ``small`` that sort before its
    end. The runs are read as they are at each step: a row written after its slice was copied is
    the caller's to write again into the result (the index notes such rows).
    """

    def __init__(self, big: Columns, small: Columns) -> None:
        self.big, self.small = big, small
        rows = len(big) + len(small)
        width = max(big.keys.dtype.itemsize, small.keys.dtype.itemsize)
        self._out = [
            np.empty((rows, *column.shape[1:]), dtype=column.dtype)
            for column in (np.empty(0, dtype=f"S{width}"), *big.columns()[1:])
        ]
        self._big_at = self._small_at = self._written = 0

    def step(self, rows: int) -> Columns | None:
        """Copy the next ``rows`` rows of ``big`` (and the rows of ``small`` before them); the
        merged run once every row is copied, else None."""
        big, small = self.big, self.small
        start, end = self._big_at, min(len(big), self._big_at + max(1, rows))
        first = self._small_at
        # Keys are unique across the runs: the small rows of this step are those below big's
        # next key (all that are left at big's end).
        last = len(small) if end == len(big) else int(np.searchsorted(small.keys, big.keys[end]))
        olds = [column[start:end] for column in big.columns()]
        news = [column[first:last] for column in small.columns()]
        olds = [column[olds[1] != DEAD] for column in olds]
        news = [column[news[1] != DEAD] for column in news]
        keys = self._out[0].dtype
        olds[0], news[0] = olds[0].astype(keys, copy=False), news[0].astype(keys, copy=False)
        count = len(olds[0]) + len(news[0])
        placed = np.searchsorted(olds[0], news[0]) + np.arange(len(news[0]))
        kept = np.ones(count, dtype=bool)
        kept[placed] = False
        at = self._written
        for out, old, new in zip(self._out, olds, news, strict=True):
            part = out[at : at + count]
            part[placed] = new
            part[kept] = old
        self._big_at, self._small_at, self._written = end, last, at + count
        if end < len(big):
            return None
        return Columns(*(out[: self._written] for out in self._out))
