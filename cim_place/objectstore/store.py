"""The local object store of one volume: blocks, pins and the operations the CLI offers.

Layout of a store directory::

    <path>/blocks/...      the blocks (:mod:`cim_place.objectstore.blockstore`)
    <path>/pins.sqlite     the pinned roots (:mod:`cim_place.objectstore.pins`)
    <path>/gc.lock         orders garbage collection against writers

Garbage collection deletes every block that no pinned root references. A writer stores its
blocks first and pins the root afterwards, so in between its blocks are unreferenced: writers
(``add``, ``import_car``) hold a shared ``flock`` on ``gc.lock`` for their whole duration and
``gc`` an exclusive one, in whichever process each runs, so a collection never deletes the
blocks of a write in progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from cim_place.closing import Closing
from cim_place.errors import CarError, InvalidCidError, PinNotFoundError, StoreError
from cim_place.interfaces import Pin
from cim_place.objectstore import car, dag, leftovers, unixfs
from cim_place.objectstore.blockstore import FsBlockStore, FsyncPolicy
from cim_place.objectstore.cid import Cid, parse, to_str
from cim_place.objectstore.pins import SqlitePinIndex
from cim_place.objectstore.unixfs import DEFAULT_PROFILE


@dataclass(frozen=True)
class GcResult:
    blocks_removed: int
    bytes_freed: int


class ObjectStore(Closing):
    """Blocks and pins of one store directory, created if needed."""

    def __init__(
        self, path: Path, *, fsync: FsyncPolicy = "file", capacity: int | None = None
    ) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the object store {self.path}: {exc.strerror or exc}; "
                "choose a writable directory (--store DIR or CIM_PLACE_STORE)"
            ) from None
        self._lock_path = self.path / "gc.lock"
        self.blocks = FsBlockStore(self.path, fsync=fsync, capacity=capacity)
        try:
            self.pins = SqlitePinIndex(self.path / "pins.sqlite")
        except BaseException:
            self.blocks.close()
            raise

    # -- writing --------------------------------------------------------------------------------

    def add(
        self,
        stream: BinaryIO,
        *,
        name: str | None = None,
        profile: str = DEFAULT_PROFILE,
        owner: str = "",
        metadata: Mapping[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Pin:
        """Import a file as a UnixFS DAG and pin its root.

        The pin is recorded only after every block is stored; a failure part way (a full
        volume, a read error) leaves no pin, and the blocks it added are journaled for
        :func:`cim_place.objectstore.leftovers.sweep` (or the next gc).
        """
        chosen = unixfs.get_profile(profile)
        with self._gc_lock(fcntl.LOCK_SH), leftovers.journaled(self) as blocks:
            result = unixfs.import_file(stream, blocks, chosen, progress=progress)
            pin = Pin(
                root=result.root,
                size=result.size,
                blocks=result.blocks,
                name=name,
                owner=owner,
                metadata=dict(metadata or {}),
                pinned_at=time.time(),
            )
            self.pins.add(pin)
        return pin

    def import_car(
        self, stream: BinaryIO, *, name: str | None = None, owner: str = ""
    ) -> list[Pin]:
        """Import a CAR v1 file, all or nothing, and pin each of its roots.

        ``name`` needs a CAR with exactly one root. A root already pinned keeps its name, owner
        and metadata unless ``name`` or ``owner`` is given (importing a CAR exported from this
        store must not unname it). Raises CarError when the file is truncated, damaged or misses
        blocks of a root's DAG; then nothing is imported or pinned.
        """

        def one_root_if_named(roots: list[Cid]) -> None:
            if name is not None and len(roots) != 1:
                raise CarError(
                    f"a pin name ({name!r}) needs a CAR file with one root, this one has "
                    f"{len(roots)}; import it without --name"
                )

        with self._gc_lock(fcntl.LOCK_SH):
            result = car.import_car(stream, self.blocks, check_roots=one_root_if_named)
            now = time.time()
            pins = []
            for root in result.roots:
                pin = Pin(
                    root=root,
                    size=self._content_size(root),
                    blocks=result.dag_blocks[root],
                    name=name,
                    owner=owner,
                    pinned_at=now,
                )
                before = self.pins.get(root)
                if before is not None and name is None and not owner:
                    pin = replace(
                        pin, name=before.name, owner=before.owner, metadata=before.metadata
                    )
                pins.append(pin)
            for pin in pins:
                self.pins.add(pin)
        return pins

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold off gc while blocks arrive outside :meth:`add` (a fetch from other nodes).

        Blocks may wait for it: gc holds the lock exclusively while it deletes.
        """
        with self._gc_lock(fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the gc lock exclusively: no write runs meanwhile (for deleting blocks)."""
        with self._gc_lock(fcntl.LOCK_EX):
            yield

    def pin_complete(
        self,
        root: Cid,
        *,
        name: str | None = None,
        owner: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> Pin:
        """Pin a root whose DAG was stored block by block (a fetch).

        Refuses with StoreError naming the first absent block unless the whole DAG is present,
        so a pin always means "complete here". Idempotent: pinning again refreshes the record.
        """
        with self._gc_lock(fcntl.LOCK_SH):
            # One walk answers both "complete?" and "how many blocks?" (a second would read
            # every dag-pb block again).
            absent, blocks = dag.survey(self.blocks, root)
            if absent:
                raise StoreError(
                    f"cannot pin {to_str(root)} in {self.path}: {len(absent)} block(s) of its DAG "
                    f"are absent, the first {to_str(absent[0])}; fetch it again"
                )
            pin = Pin(
                root=root,
                size=self._content_size(root),
                blocks=blocks,
                name=name,
                owner=owner,
                metadata=dict(metadata or {}),
                pinned_at=time.time(),
            )
            self.pins.add(pin)
        return pin

    def unpin(self, ref: str) -> Pin:
        """Forget a pin (by CID or name); its blocks stay until :meth:`gc`."""
        root = self.resolve(ref)
        pin = self.pins.get(root)
        if pin is None or not self.pins.remove(root):
            raise PinNotFoundError(
                f"{ref} is not pinned in {self.path}; list pins with `cim-place pins ls`"
            )
        return pin

    def gc(self) -> GcResult:
        """Delete every block that no pinned root references.

        Reachability comes from walking each pinned DAG. When a pinned DAG cannot be walked (a
        block missing or corrupt), nothing is deleted: the blocks below the damaged one are
        unknown and may be needed.
        """
        with self._gc_lock(fcntl.LOCK_EX):
            keep: set[Cid] = set()
            for root in self.pins.roots():
                try:
                    keep.update(dag.walk_cids(self.blocks, root))
                except StoreError as exc:
                    raise StoreError(
                        f"gc stopped, nothing deleted: the DAG of pinned root {to_str(root)} "
                        f"cannot be walked ({exc}). Fetch or import that content again, or "
                        f"unpin it (`cim-place pins rm {to_str(root)}`), then run gc again"
                    ) from None
            removed = freed = 0
            for cid in list(self.blocks.cids()):
                if cid in keep:
                    continue
                size = self.blocks.block_size(cid)
                if self.blocks.delete(cid):
                    removed += 1
                    freed += size or 0
        return GcResult(blocks_removed=removed, bytes_freed=freed)

    def collect(self, roots: Iterable[Cid]) -> GcResult:
        """Delete the blocks of the DAGs under ``roots`` that no pinned root references.

        What a drop leaves behind, without the sweep of :meth:`gc` over every block of the
        volume: the candidates are the blocks of the unpinned DAGs; the pinned DAGs are walked
        only to spare the blocks they share (raw leaves are named by their parents, not read).
        A root pinned again meanwhile is skipped. When a pinned DAG cannot be walked, nothing is
        deleted, as in :meth:`gc`.
        """
        with self._gc_lock(fcntl.LOCK_EX):
            pinned = list(self.pins.roots())
            kept = set(pinned)
            candidates: set[Cid] = set()
            for root in roots:
                if root not in kept:
                    candidates |= dag.members(self.blocks, root)[0]
            candidates = {cid for cid in candidates if self.blocks.has(cid)}
            for root in pinned:
                if not candidates:
                    break
                try:
                    candidates.difference_update(dag.walk_cids(self.blocks, root))
                except StoreError as exc:
                    raise StoreError(
                        f"collecting stopped, nothing deleted: the DAG of pinned root "
                        f"{to_str(root)} cannot be walked ({exc}); fetch that content again "
                        "or unpin it"
                    ) from None
            removed = freed = 0
            for cid in candidates:
                size = self.blocks.block_size(cid)
                if self.blocks.delete(cid):
                    removed += 1
                    freed += size or 0
            self.blocks.remove_empty_shards(candidates)
            self.pins.checkpoint()
        return GcResult(blocks_removed=removed, bytes_freed=freed)

    def verify(self, *, remove_corrupt: bool = False) -> list[Cid]:
        """Read and hash every block; the corrupt ones (removed when asked). Also recounts the
        volume's running totals. Runs under the gc lock, as it may delete blocks."""
        with self._gc_lock(fcntl.LOCK_EX):
            return self.blocks.verify(remove_corrupt=remove_corrupt)

    # -- reading --------------------------------------------------------------------------------

    def resolve(self, ref: str) -> Cid:
        """The root CID ``ref`` names: a pin name, or a CID string."""
        pin = self.pins.by_name(ref)
        if pin is not None:
            return pin.root
        try:
            return parse(ref)
        except InvalidCidError:
            raise PinNotFoundError(
                f"{ref!r} is neither a pin name nor a CID in {self.path}; "
                "list pins with `cim-place pins ls`"
            ) from None

    def cat(self, root: Cid, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """The file bytes under ``root`` (or a range), every block verified as it is read."""
        return unixfs.read_file(self.blocks, root, offset, length)

    def stat(self, root: Cid) -> Pin | None:
        return self.pins.get(root)

    def export_car(self, root: Cid, out: BinaryIO) -> int:
        """Write the DAG under ``root`` as a CAR v1; returns the bytes written."""
        return car.write_car(self.blocks, [root], out)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self.pins.close()
        self.blocks.close()

    def __repr__(self) -> str:
        return f"ObjectStore({str(self.path)!r})"

    # -- internals ------------------------------------------------------------------------------

    def _content_size(self, root: Cid) -> int:
        """File bytes for a UnixFS file; otherwise the bytes of the DAG's blocks."""
        try:
            return unixfs.file_size(self.blocks, root)
        except StoreError:
            pass
        try:
            return sum(self.blocks.block_size(cid) or 0 for cid in dag.walk_cids(self.blocks, root))
        except StoreError:
            return 0  # a codec cim-place cannot walk: the size is unknown

    @contextlib.contextmanager
    def _gc_lock(self, mode: int) -> Iterator[None]:
        # A fresh open file for each operation: flock excludes open files, not processes, so
        # two threads of one process get the same exclusion as two processes.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)
