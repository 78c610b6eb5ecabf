"""The pin index of one store: which roots are kept, under which names, in a SQLite file.

Only roots are recorded, never their blocks: garbage collection finds what to keep by walking the
DAGs of the pinned roots, so a pin costs one row whatever the size of its content. The database
runs in WAL mode with a busy timeout, so that several processes (the CLI, an agent) can use the
same store at once.

A name belongs to at most one root. Pinning a root under a name another root holds moves the name
to the new root; the old root stays pinned, without a name (a name points at the latest content
added under it).
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cim_place.closing import Closing
from cim_place.errors import StoreError
from cim_place.interfaces import Pin
from cim_place.objectstore.cid import Cid

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    root      BLOB PRIMARY KEY,
    name      TEXT UNIQUE,          -- NULL for unnamed pins; SQLite allows many NULLs
    size      INTEGER NOT NULL,
    blocks    INTEGER NOT NULL,
    owner     TEXT NOT NULL DEFAULT '',
    metadata  TEXT NOT NULL DEFAULT '{}',
    pinned_at REAL NOT NULL
) WITHOUT ROWID;
"""
_COLUMNS = "root, name, size, blocks, owner, metadata, pinned_at"


def _pin_of(row: tuple[Any, ...]) -> Pin:
    root, name, size, blocks, owner, metadata, pinned_at = row
    return Pin(
        root=bytes(root),
        size=int(size),
        blocks=int(blocks),
        name=name,
        owner=owner,
        metadata=json.loads(metadata),
        pinned_at=float(pinned_at),
    )


class SqlitePinIndex(Closing):
    """A :class:`~cim_place.interfaces.PinIndex` in a SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) for writes.
            self._db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a pin tells the domain "complete here"; it must survive a power cut once
            # recorded (pins are few, so the extra fsync per pin costs nothing noticeable).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open the pin index {self.path}: {exc}; "
                "check that the store directory is writable and the file is not damaged"
            ) from None

    def add(self, pin: Pin) -> None:
        metadata = json.dumps(dict(pin.metadata), sort_keys=True)
        with self._write() as db:
            if pin.name is not None:
                db.execute(
                    "UPDATE pins SET name = NULL WHERE name = ? AND root != ?", (pin.name, pin.root)
                )
            db.execute(
                f"INSERT OR REPLACE INTO pins ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (pin.root, pin.name, pin.size, pin.blocks, pin.owner, metadata, pin.pinned_at),
            )

    def remove(self, root: Cid) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM pins WHERE root = ?", (root,)).rowcount > 0

    def get(self, root: Cid) -> Pin | None:
        return self._one(f"SELECT {_COLUMNS} FROM pins WHERE root = ?", (root,))

    def by_name(self, name: str) -> Pin | None:
        return self._one(f"SELECT {_COLUMNS} FROM pins WHERE name = ?", (name,))

    def list(self) -> list[Pin]:
        """Every pin, oldest first."""
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM pins ORDER BY pinned_at, root").fetchall()
        return [_pin_of(row) for row in rows]

    def roots(self) -> builtins.list[Cid]:
        """The pinned roots only (what garbage collection needs)."""
        with self._read() as db:
            return [bytes(row[0]) for row in db.execute("SELECT root FROM pins")]

    def __len__(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT count(*) FROM pins").fetchone()[0])

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database and truncate it (after a collection,
        so that removing content gives back the journal's space too)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple[Any, ...]) -> Pin | None:
        with self._read() as db:
            row = db.execute(sql, args).fetchone()
        return None if row is None else _pin_of(row)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so two processes never both read and
        # then fail to upgrade (which SQLite reports as "database is locked").
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(
            f"pin index {self.path} failed: {exc}; "
            "if another cim-place process holds it, retry when it is done"
        )
