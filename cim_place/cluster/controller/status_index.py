"""The controller's status index: one row per object for ``cim-place status --state/--node/
--policy/--name`` listings, in pages ordered by CID (pure: no NATS, no I/O).

A row is what the listing shows: CID, name, state, policy, pinned / desired / damaged copies,
size and the nodes named in its locations. The leading controller writes a row each time it
reconciles an object (:meth:`StatusIndex.update` with the status the reconciler computed) and
drops it when the object leaves the domain (:meth:`StatusIndex.remove`).

Layout, for a million objects in well under 100 bytes each besides the names:

- the rows live in numpy columns kept **sorted by CID text** (``S<width>`` keys; a key is found
  by binary search, so no dict of CIDs is needed beside the projection's own); a page after a
  cursor starts with one ``searchsorted`` and filters the columns in growing chunks until it
  holds ``limit`` rows, so a common filter touches a few thousand rows and a rare one a
  vectorised pass over all of them (milliseconds at 1M: bench/status.py);
- the sorted rows are two runs (:class:`~cim_place.cluster.controller.status_columns.Columns`),
  a large ``_main`` and a small ``_recent``; a new CID goes first to a small unsorted side table
  (``_delta``), merged into ``_recent`` when it reaches :data:`MERGE_AT` rows, and ``_recent``
  is merged into ``_main`` only when it holds more than 1/:data:`RECENT_SHARE` of it. A merge
  copies the runs it joins, so one run alone made filling an empty index quadratic (every
  4,096 new rows moved every row: a third of the leader's first walk at 10M objects); with two
  runs, the large copies come once per 1/32 of growth (linear overall) and the small ones stay
  small. A page reads all three and keeps the first rows by CID;
- the large merge is made a slice at a time (``status_columns.Merge``, :data:`MERGE_STEP` rows
  of the large run per call of the index), so no call holds the event loop for the whole copy
  (1.8 s at 10M rows in one piece). While it goes on, the two runs it copies stay the index's
  rows and take writes in place; their keys are noted, and when the merged run is adopted those
  rows are copied into it again from the runs they were written to (a row written after its
  slice was copied). New rows meanwhile go to the side table and a fresh small run;
- a removed row is marked dead in place and dropped when its run is next merged;
- a row holds a name number into one blob of names; a name glob is one regular expression run
  over the blob, whose matches select rows through a table of name numbers
  (:mod:`cim_place.cluster.controller.status_names`).

The cursor is the last CID returned (text); pages after it are stable while objects come and go:
an object added behind the cursor is simply not seen by that walk, none is shown twice.
"""

from __future__ import annotations

import logging

import numpy as np

from cim_place.cluster.controller.status_columns import DEAD, WIDE, Columns, Filter, Merge, Values
from cim_place.cluster.controller.status_names import NO_NAME, NameBlob
from cim_place.cluster.controller.status_rows import MAX_LIMIT, Page, Query, Row
from cim_place.placement.status import OBJECT_STATES, ObjectStatus

__all__ = [
    "MAX_LIMIT",
    "MERGE_AT",
    "MERGE_STEP",
    "RECENT_SHARE",
    "Page",
    "Query",
    "Row",
    "StatusIndex",
]

log = logging.getLogger(__name__)

MERGE_AT = 4096
"""New rows kept aside before they are merged into the small sorted run."""
RECENT_SHARE = 32
"""The small run is merged into the large one when it holds more than 1/RECENT_SHARE of its
rows (and more than 4 x :data:`MERGE_AT` rows)."""
_STATE_CODE: dict[str, int] = {state: code for code, state in enumerate(OBJECT_STATES)}
MERGE_STEP = 16384
"""Rows of the large run a call copies while a large merge goes on (a few milliseconds)."""


class StatusIndex:
    """Rows by CID; see the module docstring. Not thread-safe (the controller's event loop)."""

    def __init__(self, merge_step: int = MERGE_STEP) -> None:
        self._merge_step = merge_step
        self._main = Columns.of([])
        self._merging: Merge | None = None  # of the former small run into _main
        self._touched: set[bytes] = set()  # keys written in the runs it copies, meanwhile
        self._rebuild_due = False
        self._recent = Columns.of([])
        self._delta: dict[bytes, Values] = {}
        self._spill: dict[bytes, tuple[int, ...]] = {}
        self._policies: list[str] = []
        self._policy_id: dict[str, int] = {}
        self._node_names: list[str] = [""]  # id 0: no node
        self._node_id: dict[str, int] = {}
        self._names = NameBlob()

    # -- writing --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(run.live for run in self._runs()) + len(self._delta)

    def update(self, status: ObjectStatus) -> None:
        """Record ``status`` as the row of its CID (a new row or a replaced one)."""
        self._adopt()
        key = status.cid.encode()
        nodes = tuple(
            self._node(node) for node in dict.fromkeys(loc.node for loc in status.locations)
        )
        old = self._delta.get(key)
        run, pos = (None, -1) if old else self._find(key)
        if run is None:
            name = self._name_of(old[6] if old else NO_NAME, status.name)
        else:
            name = self._name_of(int(run.name[pos]), status.name)
        values = (
            _STATE_CODE[status.state],
            self._policy_of(status.policy),
            min(255, status.pinned),
            min(255, status.desired),
            min(255, status.damaged),
            status.size,
            name,
            nodes,
        )
        if run is None:
            self._delta[key] = values
            if len(self._delta) >= MERGE_AT:
                self._merge()
        else:
            run.set(pos, values)
            self._note(run, key)
        if len(nodes) > WIDE:
            self._spill[key] = nodes[WIDE:]
        else:
            self._spill.pop(key, None)

    def remove(self, cid: str) -> None:
        """Forget the row of ``cid`` (the object left the domain)."""
        self._adopt()
        key = cid.encode()
        self._spill.pop(key, None)
        old = self._delta.pop(key, None)
        if old is not None:
            self._drop_name(old[6])
            return
        run, pos = self._find(key)
        if run is not None and run.state[pos] != DEAD:
            name = int(run.name[pos])
            run.kill(pos)
            self._note(run, key)
            self._drop_name(name)

    def flush(self) -> None:
        """Merge everything into the large run now, finishing a merge under way (a bench or a
        test that wants one run)."""
        self._adopt(everything=True)
        self._merge(everything=True)

    # -- reading --------------------------------------------------------------------------------

    def get(self, cid: str) -> Row | None:
        """The row of ``cid``, or None."""
        self._adopt()
        key = cid.encode()
        old = self._delta.get(key)
        if old is not None:
            return self._row(key, old)
        run, pos = self._find(key)
        if run is None or run.state[pos] == DEAD:
            return None
        return self._rows(run, [pos])[0]

    def policies(self) -> list[str]:
        """Every policy a row ever named (a policy no object uses any more stays listed)."""
        return list(self._policies)

    def nodes(self) -> list[str]:
        """Every node a row ever named."""
        return self._node_names[1:]

    def page(self, query: Query) -> Page:
        """Up to ``query.limit`` rows after ``query.after`` that pass every filter, by CID."""
        self._adopt()
        want = query.limit + 1  # one more tells whether a next page exists
        policy = self._policy_id.get(query.policy) if query.policy is not None else None
        node = self._node_id.get(query.node, 0) if query.node is not None else 0
        if (query.policy is not None and policy is None) or (query.node is not None and not node):
            return Page([], None)
        where = Filter(
            state=None if query.state is None else _STATE_CODE[query.state],
            policy=policy,
            node=node,
            names=None if query.name is None else self._names.table(query.name),
        )
        after = None if query.after is None else query.after.encode()
        # Each source gives its own first rows in CID order; the first of their union are the
        # page. A key lives in one source only.
        found: list[tuple[bytes, Columns | None, int]] = []
        for run in self._runs():
            spilled = self._spilled(run, node) if node and self._spill else None
            positions = run.scan(after, where, want, spilled)
            keys = run.keys[positions].tolist()
            found.extend((key, run, pos) for key, pos in zip(keys, positions, strict=True))
        delta = {
            key: values
            for key, values in self._delta.items()
            if (after is None or key > after)
            and (where.state is None or values[0] == where.state)
            and (policy is None or values[1] == policy)
            and (not node or node in values[7])
            and (where.names is None or bool(where.names[values[6]]))
        }
        found.extend((key, None, 0) for key in delta)
        found.sort(key=lambda item: item[0])
        chosen = found[: query.limit]
        built: dict[bytes, Row] = {}
        for run in self._runs():
            positions = [pos for _, source, pos in chosen if source is run]
            built.update((row.cid.encode(), row) for row in self._rows(run, positions))
        shown = [
            self._row(key, delta[key]) if source is None else built[key]
            for key, source, _ in chosen
        ]
        return Page(shown, shown[-1].cid if len(found) > query.limit else None)

    # -- internals ------------------------------------------------------------------------------

    def _runs(self) -> tuple[Columns, ...]:
        """The sorted runs, the one being merged into the large one included."""
        if self._merging is None:
            return (self._main, self._recent)
        return (self._main, self._merging.small, self._recent)

    def _note(self, run: Columns, key: bytes) -> None:
        """Remember a row written in a run the merge under way is copying."""
        if self._merging is not None and run is not self._recent:
            self._touched.add(key)

    def _find(self, key: bytes) -> tuple[Columns | None, int]:
        """The sorted run holding ``key`` (dead or alive) and its position, or (None, -1)."""
        for run in self._runs():
            pos = run.find(key)
            if pos >= 0:
                return run, pos
        return None, -1

    def _rows(self, run: Columns, positions: list[int]) -> list[Row]:
        return [self._row(key, values) for key, values in run.gathered(positions)]

    def _row(self, key: bytes, values: Values) -> Row:
        state, policy, pinned, desired, damaged, size, name, nodes = values
        node_names = self._node_names
        return Row(
            cid=key.decode(),
            name=self._names.text(name),
            state=OBJECT_STATES[state],
            policy=self._policies[policy],
            pinned=pinned,
            desired=desired,
            damaged=damaged,
            size=size,
            nodes=tuple(node_names[i] for i in nodes[:WIDE] if i)
            + tuple(node_names[i] for i in self._spill.get(key, ())),
        )

    def _policy_of(self, policy: str) -> int:
        pid = self._policy_id.get(policy)
        if pid is None:
            if len(self._policies) > 0xFFFF:
                raise OverflowError("more than 65536 policy names in the status index")
            pid = self._policy_id[policy] = len(self._policies)
            self._policies.append(policy)
        return pid

    def _node(self, node: str) -> int:
        nid = self._node_id.get(node)
        if nid is None:
            if len(self._node_names) > 0xFFFF:
                raise OverflowError("more than 65535 nodes in the status index")
            nid = self._node_id[node] = len(self._node_names)
            self._node_names.append(node)
        return nid

    def _name_of(self, current: int, name: str | None) -> int:
        """The name number for ``name``, reusing ``current`` when it is the same name."""
        if current != NO_NAME and self._names.text(current) == name:
            return current
        self._drop_name(current)
        return NO_NAME if name is None else self._names.add(name)

    def _spilled(self, run: Columns, node: int) -> np.ndarray:
        """Positions in ``run`` of rows whose spilled node ids hold ``node``."""
        found = [run.find(key) for key, more in self._spill.items() if node in more]
        return np.array([p for p in found if p >= 0], dtype=np.int64)

    def _drop_name(self, number: int) -> None:
        if number != NO_NAME and self._names.drop():
            if self._merging is not None:  # the rows being copied keep their numbers until then
                self._rebuild_due = True
            else:
                self._rebuild_names()

    def _rebuild_names(self) -> None:
        """Rewrite the blob with the names rows still use (renames and removals left others)."""
        runs = [(run, run.named()) for run in self._runs()]
        side = [key for key, values in self._delta.items() if values[6] != NO_NAME]
        numbers = [int(n) for run, at in runs for n in run.name[at]]
        renumbered = self._names.rebuild(numbers + [self._delta[k][6] for k in side])
        start = 0
        for run, at in runs:
            run.name[at] = renumbered[start : start + len(at)]
            start += len(at)
        for key, number in zip(side, renumbered[start:], strict=True):
            values = self._delta[key]
            self._delta[key] = (*values[:6], number, values[7])

    def _merge(self, everything: bool = False) -> None:
        """Move the side table into the small run, and that into the large one when it is due
        (a slice per call from then on) or at once with ``everything``."""
        if self._delta:
            self._recent = self._recent.merged(Columns.of(sorted(self._delta.items())))
            self._delta = {}
        if everything:
            self._main = self._main.merged(self._recent)
            self._recent = Columns.of([])
        elif self._merging is None and len(self._recent) > max(
            4 * MERGE_AT, len(self._main) // RECENT_SHARE
        ):
            try:
                merging = Merge(self._main, self._recent)
            except MemoryError:  # no room for the result now: the runs stay as they are
                log.exception("status index: no memory to merge the small run into the large one")
                return
            self._merging, self._recent = merging, Columns.of([])
            self._adopt()

    def _adopt(self, everything: bool = False) -> None:
        """Copy the next slice of the large merge (all of it with ``everything``) and, once
        done, take its result: the rows written meanwhile are copied into it again from the runs
        they were written to."""
        merging = self._merging
        if merging is None:
            return
        merged = merging.step(len(merging.big) if everything else self._merge_step)
        if merged is None:
            return
        self._merging = None
        touched, self._touched = self._touched, set()
        old = (merging.big, merging.small)
        for key in touched:
            run, pos = next((r, p) for r in old if (p := r.find(key)) >= 0)
            at = merged.find(key)
            if run.state[pos] == DEAD:
                if at >= 0:
                    merged.kill(at)
                continue
            values = next(iter(run.gathered([pos])))[1]
            if at >= 0:
                merged.set(at, values)
            else:  # dead when its slice was copied, brought back since: all its node ids
                inline = tuple(node for node in values[7] if node)
                self._delta[key] = (*values[:7], inline + self._spill.get(key, ()))
        self._main = merged
        if self._rebuild_due:
            self._rebuild_due = False
            self._rebuild_names()
