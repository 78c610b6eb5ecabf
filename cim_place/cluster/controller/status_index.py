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
- names are appended to one ``\\n``-separated UTF-8 blob and a row holds its name's number; a
  name glob becomes one regular expression run over the whole blob in C
  (:func:`glob_regex`), whose matches select the rows through a table of name numbers. The
  result is kept while the blob is unchanged, so the following pages of the same glob cost no
  search. Names replaced or dropped stay in the blob until they outnumber the live ones.

The cursor is the last CID returned (text); pages after it are stable while objects come and go:
an object added behind the cursor is simply not seen by that walk, none is shown twice.
"""

from __future__ import annotations

import fnmatch
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cim_place.placement.status import OBJECT_STATES, ObjectStatus

__all__ = ["MAX_LIMIT", "MERGE_AT", "Page", "Query", "Row", "StatusIndex", "glob_regex", "row_of"]

MAX_LIMIT = 1000
"""Most rows one page may ask for (a reply stays far below NATS' 1 MiB payload limit)."""
MERGE_AT = 4096
"""New rows kept aside before they are merged into the sorted columns."""
_DEAD = 255
_WIDE = 4
"""Node ids kept inline per row; more spill into a side dict keyed by CID."""
_NO_NAME = 0
_STATE_CODE: dict[str, int] = {state: code for code, state in enumerate(OBJECT_STATES)}
_Values = tuple[int, int, int, int, int, int, int, tuple[int, ...]]
"""A row of the side table: state, policy, pinned, desired, damaged, size, name, node ids."""
_FIRST_CHUNK = 4096
_MAX_CHUNK = 1 << 18


@dataclass(frozen=True, slots=True)
class Row:
    """One object as a listing shows it."""

    cid: str
    name: str | None
    state: str
    policy: str
    pinned: int
    desired: int
    damaged: int
    size: int
    nodes: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "cid": self.cid,
            "name": self.name,
            "state": self.state,
            "policy": self.policy,
            "pinned": self.pinned,
            "desired": self.desired,
            "damaged": self.damaged,
            "size": self.size,
            "nodes": list(self.nodes),
        }


def row_of(status: ObjectStatus) -> Row:
    """The row of a materialised status (also what a listing without a controller shows)."""
    return Row(
        cid=status.cid,
        name=status.name,
        state=status.state,
        policy=status.policy,
        pinned=status.pinned,
        desired=status.desired,
        damaged=status.damaged,
        size=status.size,
        nodes=tuple(dict.fromkeys(loc.node for loc in status.locations)),
    )


@dataclass(frozen=True, slots=True)
class Query:
    """Filters of one page (each None: any), the cursor and the page size (already checked)."""

    state: str | None = None
    node: str | None = None
    policy: str | None = None
    name: str | None = None
    """A glob over the object's name (``fnmatch`` rules, case-sensitive; ``*`` crosses ``/``)."""
    after: str | None = None
    limit: int = 100

    def matches(self, row: Row) -> bool:
        """The same filters over one row (for listings read without the index)."""
        return (
            (self.state is None or row.state == self.state)
            and (self.policy is None or row.policy == self.policy)
            and (self.node is None or self.node in row.nodes)
            and (self.name is None or (row.name is not None and name_matches(self.name, row.name)))
            and (self.after is None or row.cid > self.after)
        )


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Row]
    next: str | None
    """The cursor of the following page (the last CID here), None on the last page."""


def glob_regex(glob: str) -> str:
    """A regular expression matching what ``fnmatch.fnmatchcase(name, glob)`` matches, for names
    without a newline, that never matches a newline (so it stays inside one line of the blob)."""
    parts: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            if not parts or parts[-1] != "[^\n]*":
                parts.append("[^\n]*")
        elif char == "?":
            parts.append("[^\n]")
        elif char == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                parts.append(re.escape(char))
                continue
            # fnmatch's own translation of the bracket expression keeps its rules (ranges,
            # negation, empty ranges); the lookahead keeps a negated class off the separator.
            inner = fnmatch.translate(glob[i - 1 : j + 1])
            parts.append("(?!\n)" + inner[len("(?s:") : -len(")\\Z")])
            i = j + 1
        else:
            parts.append(re.escape(char))
    return "".join(parts)


_single: dict[str, re.Pattern[str]] = {}


def name_matches(glob: str, name: str) -> bool:
    """``fnmatch.fnmatchcase`` with the index's translation (names with a newline never match)."""
    pattern = _single.get(glob)
    if pattern is None:
        if len(_single) > 64:
            _single.clear()
        pattern = _single[glob] = re.compile(f"(?:{glob_regex(glob)})\\Z")
    return "\n" not in name and pattern.match(name) is not None


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
        self._blob = bytearray(b"\n")
        self._name_at = array("q", [-1])  # name number -> offset of the "\n" before it (0: none)
        self._garbage = 0
        self._version = 0
        self._text: tuple[int, str, np.ndarray] | None = None
        self._globbed: tuple[int, str, np.ndarray] | None = None

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
            name = self._name_of(old[6] if old else _NO_NAME, status.name)
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
            self._name[pos] = _NO_NAME
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
        return list(self._policies)

    def nodes(self) -> list[str]:
        return self._node_names[1:]

    def page(self, query: Query) -> Page:
        """Up to ``query.limit`` rows after ``query.after`` that pass every filter, by CID."""
        want = query.limit + 1  # one more tells whether a next page exists
        state = None if query.state is None else _STATE_CODE[query.state]
        policy = self._policy_id.get(query.policy) if query.policy is not None else None
        node = self._node_id.get(query.node) if query.node is not None else None
        if (query.policy is not None and policy is None) or (query.node is not None and not node):
            return Page([], None)
        names = None if query.name is None else self._name_table(query.name)
        after = None if query.after is None else query.after.encode()
        keys = self._keys
        pos = 0 if after is None else int(np.searchsorted(keys, after, side="right"))
        spilled = self._spilled_positions(node) if node and self._spill else None
        found: list[int] = []
        chunk = _FIRST_CHUNK
        while pos < len(keys) and len(found) < want:
            end = min(len(keys), pos + chunk)
            mask = (
                (self._state[pos:end] != _DEAD) if state is None else self._state[pos:end] == state
            )
            if policy is not None:
                mask &= self._policy[pos:end] == policy
            if node:
                on = (self._nodes[pos:end] == node).any(axis=1)
                if spilled is not None:
                    inside = spilled[(spilled >= pos) & (spilled < end)]
                    on[inside - pos] = True
                mask &= on
            if names is not None:
                mask &= names[self._name[pos:end]]
            hits = np.flatnonzero(mask)[: want - len(found)]
            found.extend((hits + pos).tolist())
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
        shown = [
            self._row_at(ref) if isinstance(ref, int) else self._row_from(key, ref)
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
        key = bytes(self._keys[pos])
        nodes = tuple(self._node_names[i] for i in self._nodes[pos].tolist() if i)
        return Row(
            cid=key.decode(),
            name=self._name_text(int(self._name[pos])),
            state=OBJECT_STATES[int(self._state[pos])],
            policy=self._policies[int(self._policy[pos])],
            pinned=int(self._pinned[pos]),
            desired=int(self._desired[pos]),
            damaged=int(self._damaged[pos]),
            size=int(self._size[pos]),
            nodes=nodes + tuple(self._node_names[i] for i in self._spill.get(key, ())),
        )

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
        if number == _NO_NAME:
            return None
        start = self._name_at[number] + 1
        return self._blob[start : self._blob.index(b"\n", start)].decode()

    def _name_of(self, current: int, name: str | None) -> int:
        """The name number for ``name``, reusing ``current`` when it is the same name."""
        if current != _NO_NAME and self._name_text(current) == name:
            return current
        self._drop_name(current)
        if name is None:
            return _NO_NAME
        # A newline would split the name in two lines of the blob; such a name matches no glob.
        self._version += 1
        return self._append_name(name.replace("\n", "\x00"))

    def _drop_name(self, number: int) -> None:
        if number == _NO_NAME:
            return
        self._garbage += 1
        if self._garbage > 65536 and self._garbage * 2 > len(self._name_at):
            self._compact_names()

    def _name_table(self, glob: str) -> np.ndarray:
        """A bool per name number: whether that name matches ``glob`` (kept while unchanged)."""
        if self._globbed is not None and self._globbed[:2] == (self._version, glob):
            return self._globbed[2]
        text, starts = self._decoded()
        pattern = re.compile(f"\n(?:{glob_regex(glob)})(?=\n)")
        table = np.zeros(len(self._name_at), dtype=bool)
        hits = np.fromiter((m.start() for m in pattern.finditer(text)), dtype=np.int64)
        table[np.searchsorted(starts, hits)] = True
        table[_NO_NAME] = False
        self._globbed = (self._version, glob, table)
        return table

    def _decoded(self) -> tuple[str, np.ndarray]:
        """The blob as text and where each name's line starts in it (in characters)."""
        if self._text is not None and self._text[0] == self._version:
            return self._text[1], self._text[2]
        text = self._blob.decode()
        starts = np.frombuffer(self._name_at, dtype=np.int64).copy()
        if len(text) != len(self._blob):  # not ASCII: bytes before a start -> characters
            raw = np.frombuffer(bytes(self._blob), dtype=np.uint8)
            tails = np.concatenate(([0], np.cumsum((raw & 0xC0) == 0x80)))
            starts[1:] -= tails[starts[1:]]
        self._text = (self._version, text, starts)
        return text, starts

    def _compact_names(self) -> None:
        """Rewrite the blob with the live names only (renames and removals left the rest)."""
        main = [(int(p), int(self._name[p])) for p in np.flatnonzero(self._name != _NO_NAME)]
        side = [(key, values[6]) for key, values in self._delta.items() if values[6] != _NO_NAME]
        main_texts = [(p, self._name_text(number) or "") for p, number in main]
        side_texts = [(key, self._name_text(number) or "") for key, number in side]
        self._blob = bytearray(b"\n")
        self._name_at = array("q", [-1])
        self._garbage = 0
        self._version += 1
        for p, text in main_texts:
            self._name[p] = self._append_name(text)
        for key, text in side_texts:
            values = self._delta[key]
            self._delta[key] = (*values[:6], self._append_name(text), values[7])

    def _append_name(self, text: str) -> int:
        self._name_at.append(len(self._blob) - 1)
        self._blob += text.encode() + b"\n"
        return len(self._name_at) - 1

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

    def load(self, statuses: Iterable[ObjectStatus]) -> None:
        """Record many statuses (as :meth:`update` each)."""
        for status in statuses:
            self.update(status)
