"""The records of a volume's scrub, in ``<volume>/scrub.sqlite``.

Per pinned root: when it was last verified whole, and its known damage ((block, "corrupt" |
"missing"), ...), which marks the replica damaged here until a repair or a clean check clears it.
Beside them, small JSON values by key: the cursor of the pass in progress and the end of the last
full pass (:mod:`cim_place.objectstore.scrub` writes them). A file of its own, not a table of the
pin index: the pin index says what is kept, this file what was found when it was re-read.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cim_place.errors import StoreError
from cim_place.objectstore.cid import Cid, parse, to_str

Problem = Literal["corrupt", "missing"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (
    root        BLOB PRIMARY KEY,
    verified_at REAL,               -- last time every block was read and matched; NULL never
    damage      TEXT NOT NULL DEFAULT '[]'   -- [[block CID text, problem], ...]
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class ScrubState:
    """The scrub's records in ``<volume>/scrub.sqlite``: per-root verification and damage, the
    cursor of the pass in progress, and when the last full pass ended."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a power cut may lose the last records; a pass then re-checks a root or
            # two, which is cheaper than an fsync after every root.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the scrub state {self.path}: {exc}") from None

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"scrub state {self.path} failed: {exc}") from None

    def verified(self, root: Cid, at: float) -> None:
        """Every block of ``root`` was read and matched at ``at``: not damaged any more."""
        self._run(
            "INSERT INTO replicas (root, verified_at, damage) VALUES (?, ?, '[]') "
            "ON CONFLICT(root) DO UPDATE SET verified_at = excluded.verified_at, damage = '[]'",
            (root, at),
        )

    def mark_damaged(self, root: Cid, damage: Sequence[tuple[Cid, Problem]]) -> None:
        """Record damage of ``root`` (merged with what was known)."""
        known = dict(self.damage_of(root))
        known.update(damage)
        text = json.dumps(sorted([to_str(b), p] for b, p in known.items()))
        self._run(
            "INSERT INTO replicas (root, damage) VALUES (?, ?) "
            "ON CONFLICT(root) DO UPDATE SET damage = excluded.damage",
            (root, text),
        )

    def damage_of(self, root: Cid) -> list[tuple[Cid, Problem]]:
        rows = self._run("SELECT damage FROM replicas WHERE root = ?", (root,))
        if not rows:
            return []
        return [(parse(block), problem) for block, problem in json.loads(str(rows[0][0]))]

    def damaged(self) -> dict[Cid, list[tuple[Cid, Problem]]]:
        """Every root with recorded damage."""
        rows = self._run("SELECT root, damage FROM replicas WHERE damage != '[]'")
        return {
            bytes(root): [(parse(b), p) for b, p in json.loads(str(damage))]
            for root, damage in rows
        }

    def verified_at(self, root: Cid) -> float | None:
        rows = self._run("SELECT verified_at FROM replicas WHERE root = ?", (root,))
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def forget(self, root: Cid) -> None:
        self._run("DELETE FROM replicas WHERE root = ?", (root,))

    def get(self, key: str) -> Any:
        rows = self._run("SELECT value FROM state WHERE key = ?", (key,))
        return None if not rows else json.loads(str(rows[0][0]))

    def put(self, key: str, value: object) -> None:
        self._run(
            "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, json.dumps(value))
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
