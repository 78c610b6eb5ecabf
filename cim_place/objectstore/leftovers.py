"""Leftover blocks of failed writes: recorded while written, removed soon after, without a gc.

A write (an add, a fetch) stores its blocks first and pins the root last, so a write that fails
leaves blocks no pin references. A fetch keeps them on purpose for a while (a retry then fetches
only what is still absent), but not forever. Each write keeps a journal,
``<volume>/writes/<id>.cids``: the CIDs of the blocks it *added* (a block already present is not
its to remove), appended as they are stored, the file ``flock``-ed while the write runs. A
successful write deletes its journal. :func:`sweep` removes, for every journal that is unlocked
(its writer ended or died) and older than ``older_than`` seconds, the blocks it lists that no
pinned DAG references, then the journal.

Cost: a journal line per new block (buffered, 4 bytes + the CID), and a sweep that reads only
the journals and the dag-pb nodes of the pins (never lists the volume's blocks, as gc does), and
only when a stale journal exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cim_place.interfaces import BlockStore
from cim_place.objectstore import dag
from cim_place.objectstore.cid import Cid

if TYPE_CHECKING:  # the store journals its own adds with this module
    from cim_place.objectstore.store import ObjectStore

DEFAULT_AGE = 600.0
"""Seconds a failed write's blocks stay (so a retry reuses them) before a sweep removes them."""
_LEN = struct.Struct("<I")


class JournaledBlocks:
    """A BlockStore that records in its journal every block its ``put`` adds."""

    def __init__(self, inner: BlockStore, journal: BinaryIO) -> None:
        self.inner = inner
        self._journal = journal

    def has(self, cid: Cid) -> bool:
        return self.inner.has(cid)

    def get(self, cid: Cid) -> bytes:
        return self.inner.get(cid)

    def put(self, cid: Cid, data: bytes) -> bool:
        # Journal first: a crash between the two leaves a line for an absent block (harmless),
        # never a block nobody will remove.
        self._journal.write(_LEN.pack(len(cid)) + cid)
        self._journal.flush()
        return self.inner.put(cid, data)

    def delete(self, cid: Cid) -> bool:
        return self.inner.delete(cid)

    def cids(self) -> Iterator[Cid]:
        return self.inner.cids()

    def used_bytes(self) -> int:
        return self.inner.used_bytes()


def journal_dir(store: ObjectStore) -> Path:
    return store.path / "writes"


@contextlib.contextmanager
def journaled(store: ObjectStore) -> Iterator[JournaledBlocks]:
    """The store's blocks, journaled for the duration of one write.

    Leave the ``with`` block normally only when the write succeeded (its root is pinned): the
    journal is then deleted. On an exception it stays for :func:`sweep`.
    """
    directory = journal_dir(store)
    directory.mkdir(exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}.cids"
    with open(path, "ab") as journal:
        fcntl.flock(journal.fileno(), fcntl.LOCK_EX)
        yield JournaledBlocks(store.blocks, journal)
    path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SweepResult:
    journals: int
    blocks_removed: int
    bytes_freed: int


def _stale_journals(directory: Path, older_than: float) -> list[tuple[Path, int]]:
    """(journal, open fd holding its lock) for each journal whose writer is gone and old."""
    stale: list[tuple[Path, int]] = []
    if not directory.is_dir():
        return stale
    limit = time.time() - older_than
    for path in sorted(directory.glob("*.cids")):
        try:
            if path.stat().st_mtime > limit:
                continue
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # its write is still running
            continue
        stale.append((path, fd))
    return stale


def _read_journal(path: Path) -> list[Cid]:
    data = path.read_bytes()
    cids: list[Cid] = []
    at = 0
    while at + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, at)
        at += _LEN.size
        if at + n > len(data):
            break  # a line cut by a crash
        cids.append(data[at : at + n])
        at += n
    return cids


def sweep(store: ObjectStore, *, older_than: float = DEFAULT_AGE) -> SweepResult:
    """Remove the unreferenced blocks of failed writes older than ``older_than`` seconds."""
    stale = _stale_journals(journal_dir(store), older_than)
    if not stale:
        return SweepResult(0, 0, 0)
    removed = freed = 0
    try:
        candidates: set[Cid] = set()
        for path, _ in stale:
            candidates.update(_read_journal(path))
        with store.exclusive():
            keep: set[Cid] = set()
            for root in store.pins.roots():
                # Tolerant walk: a damaged pin must not stop the sweep; what lies below one of
                # its absent nodes is unknown here, and a repair fetches it again if needed.
                keep.update(dag.members(store.blocks, root)[0])
            for cid in candidates - keep:
                size = store.blocks.block_size(cid)
                if store.blocks.delete(cid):
                    removed += 1
                    freed += size or 0
            for path, _ in stale:
                path.unlink(missing_ok=True)
    finally:
        for _, fd in stale:
            os.close(fd)
    return SweepResult(len(stale), removed, freed)


__all__ = ["DEFAULT_AGE", "JournaledBlocks", "SweepResult", "journaled", "sweep"]
