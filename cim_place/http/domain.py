"""The gateway's blocks from the whole domain: this node's volumes first, then the other nodes.

A DAG this node lacks (or holds damaged) is fetched with the domain's verified fetch into one
of this node's volumes, unpinned: a read-through cache that the next garbage collection
removes unless a task pins it. The response does not wait for the whole DAG: each block is
handed to the response as soon as the fetch has verified and stored it, so a large object
streams to the client while it arrives. A fetch per root runs at most once at a time; requests
for the same root share it.

The gateway reads blocks in worker threads; a block that is not here yet makes the thread
wait on the event loop (:meth:`DomainContent.wait_for`) for the fetch's progress.

A verifying client asks for a DAG one block at a time (``?format=raw``), naming child blocks
that no node announces (who-has answers for pinned roots only). The gateway remembers, for
the blocks it served, which root they came under (:class:`RootHints`, bounded), so a request
for a child joins the fetch of its root. A child asked for with no such history is not found.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from cim_place.errors import BlockNotFoundError, CorruptBlockError, StoreError
from cim_place.http.sources import NotHeldError, RootHints
from cim_place.interfaces import BlockSource, BlockStore
from cim_place.objectstore.cid import Cid, to_str

_log = logging.getLogger(__name__)

WAIT_TIMEOUT = 60.0
"""Seconds a read waits for one block of a running fetch before giving up."""

FindHolders = Callable[[Cid], Awaitable[Sequence[object]]]
"""The holders of a root in the domain (opaque to this module; empty: nobody)."""
FetchInto = Callable[[Cid, Sequence[object], Callable[[int, int], None]], Awaitable[object]]
"""Fetch the DAG of a root from holders into the cache volume, calling progress per block."""


@dataclass
class _Job:
    task: asyncio.Task[object]
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def tick(self, _blocks: int = 0, _bytes: int = 0) -> None:
        # Wake every waiter, then arm a fresh event for the next block.
        self.changed.set()
        self.changed = asyncio.Event()


class RecentBlocks:
    """Blocks the fetch verified and stored in the last moments, kept in memory (``capacity``
    bytes at most, oldest out first) so a response sends them without reading and hashing them
    again. Filled by the fetch's threads, read by the gateway's: guarded by a lock."""

    def __init__(self, capacity: int = 64 << 20) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[Cid, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, cid: Cid, block: bytes) -> None:
        with self._lock:
            if cid in self._blocks:
                return
            self._blocks[cid] = block
            self._bytes += len(block)
            while self._bytes > self.capacity and self._blocks:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= len(old)

    def get(self, cid: Cid) -> bytes | None:
        with self._lock:
            return self._blocks.get(cid)

    def recording(self, store: BlockStore) -> BlockStore:
        """``store`` as a fetch writes into it: every block put is also remembered here."""
        return _Recording(store, self)


class _Recording:
    """A BlockStore that remembers what is put into it (the fetch verified it first)."""

    def __init__(self, store: BlockStore, recent: RecentBlocks) -> None:
        self.store = store
        self.recent = recent

    def has(self, cid: Cid) -> bool:
        return self.store.has(cid)

    def get(self, cid: Cid) -> bytes:
        return self.store.get(cid)

    def put(self, cid: Cid, data: bytes) -> bool:
        added = self.store.put(cid, data)
        self.recent.add(cid, data)
        return added

    def delete(self, cid: Cid) -> bool:
        return self.store.delete(cid)

    def cids(self) -> Iterator[Cid]:
        return self.store.cids()

    def used_bytes(self) -> int:
        return self.store.used_bytes()


class DomainContent:
    """A ContentSource over ``local`` (this node's volumes) and the domain.

    ``repair`` lists the stores a corrupt local block may be deleted from (so that it is
    fetched again); ``find_holders`` and ``fetch`` are the domain's who-has and verified
    fetch, bound by the agent to its connection, labels and cache volume.
    """

    def __init__(
        self,
        local: BlockSource,
        *,
        repair: Sequence[BlockStore],
        find_holders: FindHolders,
        fetch: FetchInto,
        wait_timeout: float = WAIT_TIMEOUT,
    ) -> None:
        self.local = local
        self.repair = list(repair)
        self.find_holders = find_holders
        self.fetch = fetch
        self.wait_timeout = wait_timeout
        self.hints = RootHints()
        self.recent = RecentBlocks()
        """What the fetch stored lately; ``fetch`` writes through ``recent.recording(store)``."""
        self._jobs: dict[Cid, _Job] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def dag_root(self, cid: Cid) -> Cid:
        return self.hints.root_of(cid)

    def saw(self, root: Cid, cid: Cid, block: bytes) -> None:
        self.hints.note(self.hints.root_of(root), cid, block)

    async def open(self, root: Cid) -> BlockSource:
        self._loop = asyncio.get_running_loop()
        dag_root = self.hints.root_of(root)
        if not await asyncio.to_thread(self.local.has, root):
            await self._start(dag_root, required=True, asked=root)
        return _Reader(self, dag_root)

    async def _start(self, dag_root: Cid, *, required: bool, asked: Cid) -> _Job | None:
        """The running fetch of ``dag_root``, started if none runs; NotHeldError (when
        ``required``) or None when no node holds it."""
        job = self._jobs.get(dag_root)
        if job is not None and not job.task.done():
            return job
        holders = list(await self.find_holders(dag_root))
        if not holders:
            if required:
                raise NotHeldError(asked)
            return None
        job = self._jobs.get(dag_root)  # another request may have started it meanwhile
        if job is not None and not job.task.done():
            return job
        progress = _Progress()
        job = _Job(asyncio.ensure_future(self.fetch(dag_root, holders, progress)))
        progress.job = job
        job.task.add_done_callback(lambda _task: self._finished(dag_root, job))
        self._jobs[dag_root] = job
        _log.info("gateway fetching %s from %d holder(s)", to_str(dag_root), len(holders))
        return job

    def _finished(self, dag_root: Cid, job: _Job) -> None:
        """A fetch ended: forget it (a later miss starts a new one), say why if it failed."""
        if self._jobs.get(dag_root) is job:
            del self._jobs[dag_root]
        if not job.task.cancelled() and (error := job.task.exception()) is not None:
            _log.warning("gateway fetch of %s ended: %s", to_str(dag_root), error)
        job.tick()

    async def close(self) -> None:
        """Stop the fetches in progress; reads waiting for them fail at once."""
        self._closed = True
        jobs = list(self._jobs.values())
        for job in jobs:
            job.task.cancel()
        for job in jobs:
            with contextlib.suppress(BaseException):
                await job.task

    async def wait_for(self, dag_root: Cid, cid: Cid) -> None:
        """Return once ``cid`` is in the local store (fetched and verified); raise
        BlockNotFoundError when the fetch of ``dag_root`` ends without it."""
        restarted = False
        while True:
            if self._closed:
                raise BlockNotFoundError(f"{to_str(cid)} (the gateway is stopping)")
            if await asyncio.to_thread(self.local.has, cid):
                return
            job = self._jobs.get(dag_root)
            if job is None or job.task.done():
                if job is not None and job.task.done() and not job.task.cancelled():
                    error = job.task.exception()
                    if error is not None and restarted:
                        raise BlockNotFoundError(f"{to_str(cid)} ({error})")
                if restarted:
                    raise BlockNotFoundError(to_str(cid))
                # A block that vanished since (a corrupt copy removed) needs a fresh fetch.
                restarted = True
                job = await self._start(dag_root, required=False, asked=cid)
                if job is None:
                    raise BlockNotFoundError(to_str(cid))
            try:
                await asyncio.wait_for(job.changed.wait(), self.wait_timeout)
            except TimeoutError:
                raise BlockNotFoundError(
                    f"{to_str(cid)} (no block arrived for {self.wait_timeout:.0f} s)"
                ) from None

    def discard_corrupt(self, cid: Cid) -> None:
        """Delete corrupt local copies of ``cid`` so a fetch replaces them (in a thread)."""
        for store in self.repair:
            try:
                if store.has(cid):
                    store.get(cid)
            except CorruptBlockError:
                _log.error("gateway found block %s corrupt; fetching it again", to_str(cid))
                store.delete(cid)
            except StoreError:
                continue


class _Progress:
    """The fetch's progress callback, bound to its job once the job exists."""

    job: _Job | None = None

    def __call__(self, blocks: int, size: int) -> None:
        if self.job is not None:
            self.job.tick()


class _Reader:
    """The blocking source one gateway response reads from (in worker threads)."""

    def __init__(self, domain: DomainContent, dag_root: Cid) -> None:
        self.domain = domain
        self.dag_root = dag_root

    def has(self, cid: Cid) -> bool:
        return self.domain.local.has(cid)

    def get(self, cid: Cid) -> bytes:
        fetched = self.domain.recent.get(cid)
        if fetched is not None:
            return fetched
        try:
            return self.domain.local.get(cid)
        except BlockNotFoundError:
            pass
        except CorruptBlockError:
            self.domain.discard_corrupt(cid)
        loop = self.domain._loop
        if loop is None:
            raise BlockNotFoundError(to_str(cid))
        future = asyncio.run_coroutine_threadsafe(self.domain.wait_for(self.dag_root, cid), loop)
        try:
            # Bounded, so a worker thread never outlives a loop that stopped without answering.
            future.result(timeout=4 * self.domain.wait_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BlockNotFoundError(f"{to_str(cid)} (waited too long)") from None
        fetched = self.domain.recent.get(cid)
        return fetched if fetched is not None else self.domain.local.get(cid)
