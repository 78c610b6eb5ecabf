"""The filesystem blockstore: one volume's blocks as files, one file per block.

Layout of a volume directory::

    <volume>/blocks/<shard>/<name>.data    one block; <name> is the base32 (lower case, no
                                           padding) of the binary CID, <shard> its next-to-last
                                           two characters, as go-ds-flatfs does, so blocks spread
                                           evenly over 1024 shard directories
    <volume>/blocks/.usage                 running totals (bytes, blocks), so that size
                                           accounting never scans the volume
    <volume>/blocks/.tmp/<writer>/         temporary files of one open store (one per process
                                           or instance), locked with <writer>.lock while open

A block becomes addressable only by ``os.link`` of a complete temporary file to its final name:
the link fails when the name exists, which makes concurrent writers of the same block (threads or
processes) safe and tells exactly one of them that it added the block. Temporary files live in a
per-writer directory rather than beside the block, so that cleaning up after a crash on open
costs one small directory listing, not a walk over every shard.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from cim_place.closing import Closing
from cim_place.errors import BlockNotFoundError, CorruptBlockError, StoreError, StoreFullError
from cim_place.objectstore.cid import Cid, b32decode, b32encode, matches, to_str

FsyncPolicy = Literal["none", "file", "full"]
""""none": rely on the OS; "file": fsync each block file; "full": also fsync its directory."""

_FSYNC_POLICIES = ("none", "file", "full")
_SUFFIX = ".data"
_USAGE = struct.Struct("<QQ")  # used bytes, block count
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Filesystems without hard links fall back to os.replace (still atomic, but a concurrent
# writer of the same block may then also report it as new: `verify` recounts).
_NO_LINK_ERRNOS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def block_name(cid: Cid) -> str:
    """The file-system-safe name of a block: base32 lower case of its binary CID."""
    return b32encode(cid)


def cid_of_name(name: str) -> Cid | None:
    """The binary CID a block file name encodes, or None when it is not one of ours."""
    try:
        return b32decode(name)
    except ValueError:  # binascii.Error is one
        return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_checked(cid: Cid, path: Path) -> bytes:
    """The bytes of the block file ``path``, refused unless they hash to ``cid``."""
    data = path.read_bytes()
    if not matches(cid, data):
        raise CorruptBlockError(to_str(cid), str(path))
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsBlockStore(Closing):
    """A :class:`~cim_place.interfaces.BlockStore` in a directory on one disk.

    Safe for several threads and several processes on the same volume. ``capacity`` caps the
    bytes of block data the volume may hold (None: only the disk's free space limits it).
    """

    def __init__(
        self, path: Path, *, fsync: FsyncPolicy = "file", capacity: int | None = None
    ) -> None:
        if fsync not in _FSYNC_POLICIES:
            raise StoreError(f"unknown fsync policy {fsync!r}: use one of {_FSYNC_POLICIES}")
        if capacity is not None and capacity < 0:
            raise StoreError(f"capacity of volume {path} is negative ({capacity}); use bytes >= 0")
        self.path = Path(path)
        self.root = self.path / "blocks"
        self.fsync: FsyncPolicy = fsync
        self.capacity = capacity
        self._lock = threading.Lock()
        self._counter = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp_root = self.root / ".tmp"
            tmp_root.mkdir(exist_ok=True)
            _clean_dead_writers(tmp_root)
            # Our own temporary directory, locked for as long as this store is open, so that
            # another process opening the volume knows it is alive and leaves it alone.
            writer = uuid.uuid4().hex
            self._writer_lock_fd = os.open(tmp_root / f"{writer}.lock", os.O_RDWR | os.O_CREAT)
            fcntl.flock(self._writer_lock_fd, fcntl.LOCK_EX)
            self._tmp = tmp_root / writer
            self._tmp.mkdir()
            self._usage_fd = os.open(self.root / ".usage", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot open volume {self.path}: {exc.strerror or exc}; "
                "check that the directory exists and is writable"
            ) from None
        with self._usage_locked():
            if os.fstat(self._usage_fd).st_size < _USAGE.size:
                self._write_usage(*self._scan())

    # -- the BlockStore protocol --------------------------------------------------------------

    def has(self, cid: Cid) -> bool:
        return self._path_of(cid).exists()

    def get(self, cid: Cid) -> bytes:
        try:
            return _read_checked(cid, self._path_of(cid))
        except FileNotFoundError:
            raise BlockNotFoundError(to_str(cid)) from None

    def put(self, cid: Cid, data: bytes) -> bool:
        final = self._path_of(cid)
        if final.exists():
            return False
        if self.capacity is not None:
            used = self.used_bytes()
            if used + len(data) > self.capacity:
                raise self._full_error(len(data), used)
        tmp = self._write_temp(self._tmp, data)
        try:
            return self._commit(cid, tmp, len(data))
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def delete(self, cid: Cid) -> bool:
        path = self._path_of(cid)
        with self._usage_locked():
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return False
            used, count = self._read_usage()
            self._write_usage(max(0, used - size), max(0, count - 1))
        if self.fsync == "full":
            _fsync_dir(path.parent)
        return True

    def cids(self) -> Iterator[Cid]:
        for entry in self._block_files():
            cid = cid_of_name(entry.name[: -len(_SUFFIX)])
            if cid is not None:
                yield cid

    def used_bytes(self) -> int:
        with self._usage_locked():
            return self._read_usage()[0]

    # -- beyond the protocol ------------------------------------------------------------------

    def block_count(self) -> int:
        """Number of blocks held (from the running total, no scan)."""
        with self._usage_locked():
            return self._read_usage()[1]

    def block_size(self, cid: Cid) -> int | None:
        """Size in bytes of a stored block, None when absent. Does not read or verify it."""
        try:
            return self._path_of(cid).stat().st_size
        except FileNotFoundError:
            return None

    def block_path(self, cid: Cid) -> Path:
        """Where the block with this CID lives (whether or not it is present)."""
        return self._path_of(cid)

    def free_bytes(self) -> int:
        """Bytes that can still be stored: the smaller of capacity left and disk space free."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if self.capacity is not None:
            free = min(free, max(0, self.capacity - self.used_bytes()))
        return free

    def verify(self, *, remove_corrupt: bool = False) -> list[Cid]:
        """Read and hash every block; return the CIDs of corrupt ones (removed if asked).

        Also recounts the running totals from what is on disk, correcting any drift a crash
        left behind.
        """
        corrupt: list[Cid] = []
        for cid in self.cids():
            path = self._path_of(cid)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # deleted meanwhile
            if not matches(cid, data):
                corrupt.append(cid)
                if remove_corrupt:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        self.recount()
        return corrupt

    def recount(self) -> int:
        """Recompute the running totals by scanning the volume; returns the bytes used."""
        with self._usage_locked():
            used, count = self._scan()
            self._write_usage(used, count)
        return used

    def staging(self) -> Staging:
        """A place to write blocks that must not be addressable yet (see :class:`Staging`)."""
        self._counter += 1
        directory = self._tmp / f"stage-{self._counter}-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        return Staging(self, directory)

    def close(self) -> None:
        """Release this store's temporary directory. The store must not be used afterwards."""
        if self._writer_lock_fd < 0:
            return
        shutil.rmtree(self._tmp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self._tmp.parent / f"{self._tmp.name}.lock").unlink()
        os.close(self._writer_lock_fd)
        os.close(self._usage_fd)
        self._writer_lock_fd = self._usage_fd = -1

    def __repr__(self) -> str:
        return f"FsBlockStore({str(self.path)!r}, fsync={self.fsync!r}, capacity={self.capacity})"

    # -- internals ----------------------------------------------------------------------------

    def remove_empty_shards(self, cids: Iterable[Cid]) -> None:
        """Remove the shard directories of ``cids`` that are empty now. Call only while no
        writer runs (under the store's exclusive gc lock): a put creates its shard first."""
        for shard in {self._path_of(cid).parent for cid in cids}:
            with contextlib.suppress(OSError):  # not empty, or already gone
                shard.rmdir()

    def _path_of(self, cid: Cid) -> Path:
        name = block_name(cid)
        return self.root / name[-3:-1] / (name + _SUFFIX)

    def _shards(self) -> Iterator[Path]:
        with os.scandir(self.root) as entries:
            shards = [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]
        yield from sorted(shards)

    def _block_files(self) -> Iterator[os.DirEntry[str]]:
        for shard in self._shards():
            with os.scandir(shard) as entries:
                for entry in entries:
                    if entry.name.endswith(_SUFFIX):
                        yield entry

    def _full_error(self, need: int, used: int | None = None) -> StoreFullError:
        """The volume cannot take ``need`` more bytes: over capacity with ``used`` bytes used,
        or (``used`` None) the disk itself is full."""
        if used is None:
            cause = "no space left on the disk"
        else:
            cause = f"capacity {self.capacity} bytes reached, {used} bytes used"
        return StoreFullError(
            f"volume {self.path} is full ({cause}; block of {need} bytes not stored): "
            "free space with `cim-place gc`, raise the volume's capacity, or add a volume"
        )

    def _write_temp(self, directory: Path, data: bytes | memoryview) -> Path:
        """Write ``data`` to a new file in ``directory``; the file is never a block by itself."""
        self._counter += 1
        tmp = directory / f"{self._counter}-{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
            if self.fsync != "none":
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if exc.errno in _FULL_ERRNOS:
                raise self._full_error(len(data)) from None
            raise StoreError(
                f"cannot write a block in volume {self.path}: {exc.strerror or exc}"
            ) from None
        os.close(fd)
        return tmp

    def _commit(self, cid: Cid, tmp: Path, size: int) -> bool:
        """Make a complete temporary file addressable as ``cid``; False if already present."""
        final = self._path_of(cid)
        with self._usage_locked():
            used, count = self._read_usage()
            if self.capacity is not None and used + size > self.capacity:
                if final.exists():
                    return False
                raise self._full_error(size, used)
            try:
                added = self._link(tmp, final)
            except OSError as exc:
                if exc.errno in _FULL_ERRNOS:
                    raise self._full_error(size) from None
                raise StoreError(
                    f"cannot store block {to_str(cid)} in volume {self.path}: {exc.strerror or exc}"
                ) from None
            if added:
                self._write_usage(used + size, count + 1)
        if added and self.fsync == "full":
            _fsync_dir(final.parent)
        return added

    def _link(self, tmp: Path, final: Path) -> bool:
        for _ in range(2):
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:
                if not tmp.exists():
                    raise
                final.parent.mkdir(exist_ok=True)  # first block of this shard
                if self.fsync == "full":
                    _fsync_dir(final.parent.parent)
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                if final.exists():
                    return False
                os.replace(tmp, final)
                return True
        raise StoreError(f"cannot create shard directory {final.parent}")

    def _scan(self) -> tuple[int, int]:
        used = count = 0
        for entry in self._block_files():
            with contextlib.suppress(FileNotFoundError):
                used += entry.stat().st_size
                count += 1
        return used, count

    @contextlib.contextmanager
    def _usage_locked(self) -> Iterator[None]:
        # The thread lock orders threads of this process (they share one file description, on
        # which flock would not exclude them); flock orders the processes.
        with self._lock:
            fcntl.flock(self._usage_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._usage_fd, fcntl.LOCK_UN)

    def _read_usage(self) -> tuple[int, int]:
        raw = os.pread(self._usage_fd, _USAGE.size, 0)
        if len(raw) < _USAGE.size:
            return 0, 0
        used, count = _USAGE.unpack(raw)
        return int(used), int(count)

    def _write_usage(self, used: int, count: int) -> None:
        os.pwrite(self._usage_fd, _USAGE.pack(used, count), 0)


class Staging(Closing):
    """Blocks written to the volume but not addressable until :meth:`commit`.

    Used to import content from outside (a CAR file) all or nothing: everything is verified and
    staged first; ``commit`` then links the blocks into place, and rolls back the ones it added
    if it cannot finish (the volume fills up). ``abort`` (or leaving the ``with`` block without
    committing) forgets them. A staging area also reads as a block source, so that a DAG can be
    checked for completeness across the store and the staged blocks before committing.
    """

    def __init__(self, store: FsBlockStore, directory: Path) -> None:
        self._store = store
        self._dir = directory
        self._staged: dict[Cid, tuple[Path, int]] = {}

    def __len__(self) -> int:
        return len(self._staged)

    def put(self, cid: Cid, data: bytes) -> bool:
        if self.has(cid):
            return False
        self._staged[cid] = (self._store._write_temp(self._dir, data), len(data))
        return True

    def has(self, cid: Cid) -> bool:
        return cid in self._staged or self._store.has(cid)

    def get(self, cid: Cid) -> bytes:
        staged = self._staged.get(cid)
        if staged is None:
            return self._store.get(cid)
        return _read_checked(cid, staged[0])

    def commit(self) -> list[Cid]:
        """Make every staged block addressable; returns those that were new to the store."""
        added: list[Cid] = []
        try:
            for cid, (tmp, size) in self._staged.items():
                if self._store._commit(cid, tmp, size):
                    added.append(cid)
        except BaseException:
            for cid in added:
                self._store.delete(cid)
            raise
        finally:
            self.abort()
        return added

    def abort(self) -> None:
        self._staged.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    close = abort  # what ``with`` calls on the way out (Closing)


def _clean_dead_writers(tmp_root: Path) -> None:
    """Remove temporary directories of writers that are gone (a crash, a kill)."""
    with os.scandir(tmp_root) as entries:
        names = [entry.name for entry in entries]
    present = set(names)
    for name in names:
        if name.endswith(".lock"):
            writer = name[: -len(".lock")]
            try:
                fd = os.open(tmp_root / name, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its writer is alive
            try:
                shutil.rmtree(tmp_root / writer, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    (tmp_root / name).unlink()
            finally:
                os.close(fd)
        elif f"{name}.lock" not in present and not (tmp_root / f"{name}.lock").exists():
            # A writer creates and locks its .lock before its directory (and clean-up removes
            # the directory first), so a directory without one is what a crash left behind.
            shutil.rmtree(tmp_root / name, ignore_errors=True)
