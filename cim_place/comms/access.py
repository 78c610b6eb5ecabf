"""The receiving side of offload: resolving a ContentRef to its bytes, verified.

This module owns how a receiver reads offloaded content, lazily (only when the application asks):

1. **Local blocks first**: each local block source the client was given (the volumes of an agent
   running beside it, for instance), then the accessor's own cache of earlier fetches. A source
   that lacks a block is skipped.
2. Otherwise ask who holds the root pinned (``cim_place.cluster.exchange.holders``) and fetch the
   DAG
   from them (``cim_place.cluster.exchange.fetch``) into the cache: every block is verified against
   its
   CID on arrival and again when read.
3. Read the file bytes back (``cim_place.objectstore.unixfs.read_file``) and check the size the
   message announced.

Authorization: the fetch travels on the receiver's own NATS connection, so the holders see the
receiver's identity as NATS established it (the user whose inbox prefix its reply subjects carry,
``cim_place.cluster.nats.security``), never a name the receiver declares, and every block request
names the root it is for. A holder that refuses makes the accessor raise
:class:`ContentAccessDeniedError` (an ``AccessDeniedError``), naming the content and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cim_place.cluster.exchange.fetch import fetch_dag
from cim_place.cluster.exchange.fetch_model import BlockUnavailableError, Labels
from cim_place.cluster.exchange.holders import find_holders
from cim_place.cluster.nats.security import AccessDeniedError
from cim_place.cluster.nats.subjects import Subjects
from cim_place.comms.content import ContentRef
from cim_place.errors import BlockNotFoundError, CimPlaceError, StoreError, TransportError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.blockstore import FsBlockStore
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.unixfs import read_file

__all__ = [
    "ContentAccessDeniedError",
    "ContentAccessor",
    "ContentUnavailableError",
]

_log = logging.getLogger(__name__)

DEFAULT_HOLDER_TIMEOUT = 1.0


class ContentUnavailableError(TransportError):
    """Offloaded content that no reachable node holds, or that does not match its reference."""


class ContentAccessDeniedError(AccessDeniedError):
    """The holders refused to serve offloaded content to this receiver (object access control)."""


class ContentAccessor:
    """Reads offloaded content for one receiver (its connection ``nc``).

    ``local``: block sources read before anything is fetched. ``cache_dir``: where fetched blocks
    are kept (default: a temporary directory removed by :meth:`close`). ``near``: this receiver's
    failure-domain labels, so the nearest holders are asked first.
    """

    def __init__(
        self,
        nc: Any,
        *,
        subjects: Subjects | None = None,
        local: Sequence[BlockSource] = (),
        cache_dir: Path | None = None,
        near: Labels | None = None,
        holder_timeout: float = DEFAULT_HOLDER_TIMEOUT,
        fetch_timeout: float = 10.0,
    ) -> None:
        self.nc = nc
        self.subjects = subjects if subjects is not None else Subjects()
        self.local = list(local)
        self.near = near
        self.holder_timeout = holder_timeout
        self.fetch_timeout = fetch_timeout
        self._cache_dir = cache_dir
        self._temporary: Path | None = None
        self._cache: FsBlockStore | None = None
        self._fetching: dict[bytes, asyncio.Lock] = {}
        self.fetches = 0
        """DAGs fetched from holders (the rest came from local blocks or the cache)."""

    @property
    def cache(self) -> FsBlockStore:
        if self._cache is None:
            directory = self._cache_dir
            if directory is None:
                self._temporary = directory = Path(tempfile.mkdtemp(prefix="cim-place-comms-"))
            self._cache = FsBlockStore(directory, fsync="none")
        return self._cache

    async def read(self, ref: ContentRef) -> bytes | str:
        """The content as it was sent: a str for text, bytes otherwise."""
        data = await self.read_bytes(ref)
        return data.decode("utf-8") if ref.encoding == "utf-8" else data

    async def read_bytes(self, ref: ContentRef) -> bytes:
        """The content's bytes, from local blocks or fetched from its holders, verified."""
        for source in self.local:
            data = await self._read_from(source, ref)
            if data is not None:
                return data
        lock = self._fetching.setdefault(ref.cid, asyncio.Lock())
        async with lock:
            data = await self._read_from(self.cache, ref)
            if data is None:
                await self._fetch(ref)
                data = await self._read_from(self.cache, ref, strict=True)
        assert data is not None
        return data

    async def _read_from(
        self, source: BlockSource, ref: ContentRef, *, strict: bool = False
    ) -> bytes | None:
        if not strict and not source.has(ref.cid):
            return None
        try:
            data = await asyncio.to_thread(lambda: b"".join(read_file(source, ref.cid)))
        except BlockNotFoundError:
            if strict:
                raise
            return None
        if len(data) != ref.size:
            raise ContentUnavailableError(
                f"offloaded content {to_str(ref.cid)} holds {len(data)} bytes but its message "
                f"says {ref.size}: the message is inconsistent; ask its sender to send it again"
            )
        return data

    async def _fetch(self, ref: ContentRef) -> None:
        root = to_str(ref.cid)
        holders = await find_holders(
            self.nc, ref.cid, timeout=self.holder_timeout, expected=1, subjects=self.subjects
        )
        if not holders:
            raise ContentUnavailableError(
                f"no node holds the offloaded content {root} pinned (no answer to who-has "
                f"within {self.holder_timeout:g} s); check that the sender's agent runs and "
                "that the content was not dropped (`cim-place status`)"
            )
        try:
            await fetch_dag(
                self.nc,
                ref.cid,
                holders,
                self.cache,
                subjects=self.subjects,
                near=self.near,
                timeout=self.fetch_timeout,
            )
        except AccessDeniedError as error:
            raise ContentAccessDeniedError(
                f"not allowed to read offloaded content {root} with this connection's NATS user: "
                f"{error}; ask the sender to list you among the readers (Comms readers=...)"
            ) from error
        except (BlockUnavailableError, TransportError) as error:
            raise ContentUnavailableError(
                f"cannot fetch offloaded content {root}: {error}"
            ) from error
        except StoreError as error:
            raise ContentUnavailableError(
                f"offloaded content {root} could not be stored locally: {error}"
            ) from error
        self.fetches += 1

    def close(self) -> None:
        """Release the cache (and delete it when it was a temporary directory)."""
        if self._cache is not None:
            with contextlib.suppress(CimPlaceError, OSError):
                self._cache.close()
            self._cache = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None
