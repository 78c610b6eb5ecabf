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
- a new CID goes first to a small unsorted side table (``_delta``), merged into the columns
  when it reaches :data:`MERGE_AT` rows (one ``np.insert`` per column, a memory move of the
  columns); a page reads both;
- a removed row is marked dead in place and dropped at the next merge;
- a row holds a name number into one blob of names; a name glob is one regular expression run
  over the blob, whose matches select rows through a table of name numbers
  (:mod:`cim_place.cluster.controller.status_names`).

The cursor is the last CID returned (text); pages after it are stable while objects come and go:
an object added behind the cursor is simply not seen by that walk, none is shown twice.
"""

from __future__ import annotations

import numpy as np

from cim_place.cluster.controller.status_names import NO_NAME, NameBlob
from cim_place.cluster.controller.status_rows import MAX_LIMIT, Page, Query, Row
from cim_place.placement.status import OBJECT_STATES, ObjectStatus

__all__ = ["MAX_LIMIT", "MERGE_AT", "Page", "Query", "Row", "StatusIndex"]

MERGE_AT = 4096
"""New rows kept aside before they are merged into the sorted columns."""
_DEAD = 255
_WIDE = 4
"""Node ids kept inline per row; more spill into a side dict keyed by CID."""
_STATE_CODE: dict[str, int] = {state: code for code, state in enumerate(OBJECT_STATES)}
_Values = tuple[int, int, int, int, int, int, int, tuple[int, ...]]
"""A row of the side table: state, policy, pinned, desired, damaged, size, name, node ids."""
_FIRST_CHUNK = 4096
_MAX_CHUNK = 1 << 18


class StatusIndex:
    """Rows by CID; see the module docstring. Not thread-safe (the controller's event loop)."""

    def __init__(self) -> None:
        self._keys: np.ndarray = np.zeros(0, dtype="S1")
        self._state = np.zeros(0, dtype=np.uint8)
        self._policy = np.zeros(0, dtype=np.uint16)
        self._pinned = np.zeros(0, dtype=np.uint8)
        self._desired = np.zeros(0, dtype=np.uint8)
        self._damaged = np.zeros(0, dtype=np.uint8)
        self._size = np.zeros(0, dtype=np.int64)
        self._name = np.zeros(0, dtype=np.uint32)
        self._nodes = np.zeros((0, _WIDE), dtype=np.uint16)
        self._dead = 0
        self._delta: dict[bytes, _Values] = {}
        self._spill: dict[bytes, tuple[int, ...]] = {}
        self._policies: list[str] = []
        self._policy_id: dict[str, int] = {}
        self._node_names: list[str] = [""]  # id 0: no node
        self._node_id: dict[str, int] = {}
        self._names = NameBlob()

    # -- writing --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys) - self._dead + len(self._delta)

    def update(self, status: ObjectStatus) -> None:
        """Record ``status`` as the row of its CID (a new row or a replaced one)."""
        key = status.cid.encode()
        nodes = tuple(
            self._node(node) for node in dict.fromkeys(loc.node for loc in status.locations)
        )
        pinned = min(255, status.pinned)
        desired = min(255, status.desired)
        damaged = min(255, status.damaged)
        policy = self._policy_of(status.policy)
        state = _STATE_CODE[status.state]
        pos = self._find(key)
        if pos < 0:
            old = self._delta.get(key)
            name = self._name_of(old[6] if old else NO_NAME, status.name)
            self._delta[key] = (state, policy, pinned, desired, damaged, status.size, name, nodes)
            if len(self._delta) >= MERGE_AT:
                self._merge()
        else:
            if self._state[pos] == _DEAD:
                self._dead -= 1
            self._state[pos] = state
            self._policy[pos] = policy
            self._pinned[pos] = pinned
            self._desired[pos] = desired
            self._damaged[pos] = damaged
            self._size[pos] = status.size
            self._name[pos] = self._name_of(int(self._name[pos]), status.name)
            self._nodes[pos] = (*nodes[:_WIDE], *([0] * (_WIDE - len(nodes[:_WIDE]))))
        if len(nodes) > _WIDE:
            self._spill[key] = nodes[_WIDE:]
        else:
            self._spill.pop(key, None)

    def remove(self, cid: str) -> None:
        """Forget the row of ``cid`` (the object left the domain)."""
        key = cid.encode()
        self._spill.pop(key, None)
        old = self._delta.pop(key, None)
        if old is not None:
            self._drop_name(old[6])
            return
        pos = self._find(key)
        if pos >= 0 and self._state[pos] != _DEAD:
            self._state[pos] = _DEAD
            self._drop_name(int(self._name[pos]))
            self._name[pos] = NO_NAME
            self._dead += 1

    # -- reading --------------------------------------------------------------------------------

    def get(self, cid: str) -> Row | None:
        """The row of ``cid``, or None."""
        key = cid.encode()
        old = self._delta.get(key)
        if old is not None:
            return self._row_from(key, old)
        pos = self._find(key)
        return None if pos < 0 or self._state[pos] == _DEAD else self._row_at(pos)

    def policies(self) -> list[str]:
        """Every policy a row ever named (a policy no object uses any more stays listed)."""
        return list(self._policies)

    def nodes(self) -> list[str]:
        """Every node a row ever named."""
        return self._node_names[1:]

    def page(self, query: Query) -> Page:
        """Up to ``query.limit`` rows after ``query.after`` that pass every filter, by CID."""
        want = query.limit + 1  # one more tells whether a next page exists
        state = None if query.state is None else _STATE_CODE[query.state]
        policy = self._policy_id.get(query.policy) if query.policy is not None else None
        node = self._node_id.get(query.node) if query.node is not None else None
        if (query.policy is not None and policy is None) or (query.node is not None and not node):
            return Page([], None)
        names = None if query.name is None else self._names.table(query.name)
        after = None if query.after is None else query.after.encode()
        keys = self._keys
        pos = 0 if after is None else int(np.searchsorted(keys, after, side="right"))
        spilled = self._spilled_positions(node) if node and self._spill else None
        found: list[int] = []
        chunk = _FIRST_CHUNK
        while pos < len(keys) and len(found) < want:
            end = min(len(keys), pos + chunk)
            # The first filter runs over the chunk; the others only over the rows it kept (a
            # gather each), so a rare combination costs one compare per row, not four.
            if state is not None:
                hits = np.flatnonzero(self._state[pos:end] == state) + pos
            elif policy is not None:
                hits = np.flatnonzero(self._policy[pos:end] == policy) + pos
                hits = hits[self._state[hits] != _DEAD]
            elif names is not None:  # a dead row has no name: the table excludes it
                hits = np.flatnonzero(names[self._name[pos:end]]) + pos
            else:
                hits = np.flatnonzero(self._state[pos:end] != _DEAD) + pos
            if policy is not None and state is not None:
                hits = hits[self._policy[hits] == policy]
            if names is not None and (state is not None or policy is not None):
                hits = hits[names[self._name[hits]]]
            if node:
                on = (self._nodes[hits] == node).any(axis=1)
                if spilled is not None:
                    on |= np.isin(hits, spilled)
                hits = hits[on]
            found.extend(hits[: want - len(found)].tolist())
            pos = end
            chunk = min(chunk * 4, _MAX_CHUNK)
        rows: list[tuple[bytes, int | _Values]] = [(bytes(keys[p]), p) for p in found]
        if self._delta:
            rows.extend(
                (key, values)
                for key, values in self._delta.items()
                if (after is None or key > after)
                and (state is None or values[0] == state)
                and (policy is None or values[1] == policy)
                and (not node or node in values[7])
                and (names is None or bool(names[values[6]]))
            )
            rows.sort(key=lambda item: item[0])
        chosen = rows[:want]
        built = iter(
            self._rows_at([ref for _, ref in chosen[: query.limit] if isinstance(ref, int)])
        )
        shown = [
            next(built) if isinstance(ref, int) else self._row_from(key, ref)
            for key, ref in chosen[: query.limit]
        ]
        return Page(shown, shown[-1].cid if len(chosen) > query.limit else None)

    # -- internals ------------------------------------------------------------------------------

    def _find(self, key: bytes) -> int:
        keys = self._keys
        if not len(keys) or len(key) > keys.dtype.itemsize:
            return -1
        pos = int(np.searchsorted(keys, key))
        return pos if pos < len(keys) and keys[pos] == key else -1

    def _row_at(self, pos: int) -> Row:
        return self._rows_at([pos])[0]

    def _rows_at(self, positions: list[int]) -> list[Row]:
        """Rows at ``positions``: one gather per column, not a numpy scalar per field."""
        at = np.array(positions, dtype=np.int64)
        node_names, policies, spill, text = (
            self._node_names,
            self._policies,
            self._spill,
            self._names.text,
        )
        return [
            Row(
                cid=key.decode(),
                name=text(name),
                state=OBJECT_STATES[state],
                policy=policies[policy],
                pinned=pinned,
                desired=desired,
                damaged=damaged,
                size=size,
                nodes=tuple(node_names[i] for i in inline if i)
                + tuple(node_names[i] for i in spill.get(key, ())),
            )
            for key, state, policy, pinned, desired, damaged, size, name, inline in zip(
                self._keys[at].tolist(),
                self._state[at].tolist(),
                self._policy[at].tolist(),
                self._pinned[at].tolist(),
                self._desired[at].tolist(),
                self._damaged[at].tolist(),
                self._size[at].tolist(),
                self._name[at].tolist(),
                self._nodes[at].tolist(),
                strict=True,
            )
        ]

    def _row_from(self, key: bytes, values: _Values) -> Row:
        state, policy, pinned, desired, damaged, size, name, nodes = values
        return Row(
            cid=key.decode(),
            name=self._name_text(name),
            state=OBJECT_STATES[state],
            policy=self._policies[policy],
            pinned=pinned,
            desired=desired,
            damaged=damaged,
            size=size,
            nodes=tuple(self._node_names[i] for i in nodes),
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

    def _spilled_positions(self, node: int) -> np.ndarray:
        found = [self._find(key) for key, more in self._spill.items() if node in more]
        return np.array([p for p in found if p >= 0], dtype=np.int64)

    def _name_text(self, number: int) -> str | None:
        return self._names.text(number)

    def _name_of(self, current: int, name: str | None) -> int:
        """The name number for ``name``, reusing ``current`` when it is the same name."""
        if current != NO_NAME and self._names.text(current) == name:
            return current
        self._drop_name(current)
        return NO_NAME if name is None else self._names.add(name)

    def _drop_name(self, number: int) -> None:
        if number != NO_NAME and self._names.drop():
            # Rewrite the blob with the names rows still use (renames and removals left others).
            main = np.flatnonzero(self._name != NO_NAME)
            side = [key for key, values in self._delta.items() if values[6] != NO_NAME]
            numbers = [int(n) for n in self._name[main]] + [self._delta[k][6] for k in side]
            renumbered = self._names.rebuild(numbers)
            self._name[main] = renumbered[: len(main)]
            for key, number in zip(side, renumbered[len(main) :], strict=True):
                values = self._delta[key]
                self._delta[key] = (*values[:6], number, values[7])

    def _merge(self) -> None:
        """Move the side table into the sorted columns, dropping dead rows on the way."""
        if self._dead:
            alive = self._state != _DEAD
            for column in ("_keys", "_state", "_policy", "_pinned", "_desired", "_damaged"):
                setattr(self, column, getattr(self, column)[alive])
            self._size, self._name, self._nodes = (
                self._size[alive],
                self._name[alive],
                self._nodes[alive],
            )
            self._dead = 0
        if not self._delta:
            return
        items = sorted(self._delta.items())
        self._delta = {}
        width = max(self._keys.dtype.itemsize, max(len(key) for key, _ in items))
        keys = np.array([key for key, _ in items], dtype=f"S{width}")
        if width > self._keys.dtype.itemsize:
            self._keys = self._keys.astype(keys.dtype)
        at = np.searchsorted(self._keys, keys)
        values = list(zip(*(v for _, v in items), strict=True))
        self._keys = np.insert(self._keys, at, keys)
        self._state = np.insert(self._state, at, np.array(values[0], dtype=np.uint8))
        self._policy = np.insert(self._policy, at, np.array(values[1], dtype=np.uint16))
        self._pinned = np.insert(self._pinned, at, np.array(values[2], dtype=np.uint8))
        self._desired = np.insert(self._desired, at, np.array(values[3], dtype=np.uint8))
        self._damaged = np.insert(self._damaged, at, np.array(values[4], dtype=np.uint8))
        self._size = np.insert(self._size, at, np.array(values[5], dtype=np.int64))
        self._name = np.insert(self._name, at, np.array(values[6], dtype=np.uint32))
        inline = np.zeros((len(items), _WIDE), dtype=np.uint16)
        for row, nodes in enumerate(values[7]):
            inline[row, : min(_WIDE, len(nodes))] = nodes[:_WIDE]
        self._nodes = np.insert(self._nodes, at, inline, axis=0)

    def flush(self) -> None:
        """Merge the side table now (a bench or a test that wants the sorted columns only)."""
        self._merge()
