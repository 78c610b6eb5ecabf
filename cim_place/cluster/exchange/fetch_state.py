"""The state of one fetch and what both of its transfer paths share.

This module owns ``FetchState``, the base of the fetch in :mod:`cim_place.cluster.exchange.fetch`:
the walk's bookkeeping, the choice of a holder for each CID (nearest usable first, rotating
inside a tier, failing holders last), the ``Batch`` of CIDs asked of one holder, a holder's
``StreamSession``, and the accounting of a received block (verified against its CID, stored,
its children queued). The two paths, block stream (``fetch_stream``) and NATS request/reply
(``fetch_nats``), derive from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

from cim_place.cluster.exchange.block_wire import MAX_REQUEST_CIDS
from cim_place.cluster.exchange.fetch_model import (
    FetchResult,
    Holder,
    HolderStats,
    Labels,
    order_holders,
)
from cim_place.cluster.exchange.ratelimit import Throttle
from cim_place.cluster.exchange.stream_client import StreamClient
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import StoreError
from cim_place.interfaces import BlockStore
from cim_place.objectstore.cid import DAG_PB, RAW, Cid, codec_of, matches, to_str
from cim_place.objectstore.dagpb import decode_node

__all__ = ["UNKNOWN_SIZE", "Batch", "FetchState", "StreamSession", "in_thread"]

_log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

# The size assumed for a block whose size no parent link told (the root, internal nodes).
UNKNOWN_SIZE = 1 << 20


async def in_thread(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``asyncio.to_thread`` that, when cancelled, still waits for the thread to finish.

    A thread cannot be stopped; waiting for it means that once fetch_dag has returned or raised
    (cancellation included) nothing more is written to the store on its behalf.
    """
    work = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


# -- one fetch ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Batch:
    holder: Holder
    cids: list[Cid]
    received: set[Cid] = field(default_factory=set)
    missing: list[Cid] = field(default_factory=list)
    children: list[Cid] = field(default_factory=list)
    failed: str = ""
    absent: bool = False
    """The holder's subject has no responders (no agent serves it)."""
    corrupt: bool = False
    denied: str = ""


class StreamSession:
    """One holder's block stream during a fetch: answers arrive in the order GETs were sent,
    so each batch reads its answer after the previous batch has read its own."""

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.last: asyncio.Future[None] | None = None
        self.broken = ""
        """Why the connection is unusable ("" while it works)."""
        self.corrupt = False


class FetchState:
    """One fetch's state; the paths and the walk derive from it."""

    def __init__(
        self,
        nc: Any,
        root: Cid,
        holders: Sequence[Holder],
        store: BlockStore,
        *,
        window: int,
        batch: int,
        batch_bytes: int,
        subjects: Subjects,
        near: Labels | None,
        timeout: float,
        bandwidth: Throttle | None,
        progress: Callable[[int, int], None] | None,
        stream: bool = True,
        stream_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.nc = nc
        self.use_stream = stream
        self.stream_tls = stream_tls
        # Per holder: its stream session, or None once it is known not to have a usable one.
        self.sessions: dict[str, StreamSession | None] = {}
        self.session_locks: dict[str, asyncio.Lock] = {}
        self.root = root
        self.store = store
        self.window = max(1, window)
        self.batch = max(1, min(batch, MAX_REQUEST_CIDS))
        self.batch_bytes = max(1, batch_bytes)
        if bandwidth is not None:
            # A throttled fetch asks for about a quarter second of traffic per batch: what a
            # holder sends on NATS is not flow controlled, so big batches would arrive at full
            # speed and only wait in this process's buffers.
            self.batch_bytes = min(self.batch_bytes, max(1, int(bandwidth.rate / 4)))
        # Expected block sizes from the parents' link sizes (exact for leaves), to fill batches
        # by bytes; an internal node's link size covers its subtree, so it is capped.
        self.sizes: dict[Cid, int] = {}
        self.subjects = subjects
        self.timeout = timeout
        self.bandwidth = bandwidth
        self.progress = progress
        self.tiers = order_holders(holders, near)
        self.result = FetchResult(root=root)
        for tier in self.tiers:
            for holder in tier:
                self.result.holders[holder.node] = HolderStats()
        self.walk: deque[Cid] = deque([root])
        self.seen: set[Cid] = {root}
        self.wanted: deque[Cid] = deque()
        # Per CID: holders that answered "missing" (never asked again for it), and holders
        # whose request for it failed (asked again only when no fresh holder is left).
        self.refused: dict[Cid, set[str]] = {}
        self.failed: dict[Cid, set[str]] = {}
        self.streak: dict[str, int] = {}
        self.rotation = itertools.count()
        self.inbox = ""
        self.queues: dict[str, asyncio.Queue[bytes]] = {}
        self.serial = itertools.count()

    # -- holders --
    def _usable(self, holder: Holder) -> bool:
        return not self.result.holders[holder.node].skipped

    def _choose(self, cid: Cid, turn: int) -> Holder | None:
        """The nearest usable holder for ``cid``, rotating inside a tier: first among those not
        yet asked for it, then among those whose request failed (timeouts pass)."""
        refused = self.refused.get(cid, set())
        failed = self.failed.get(cid, set())
        # A holder whose last request failed (a timeout: it may be dead) is avoided for every
        # CID, not only the ones it failed, while another holder can be asked: a dead peer then
        # costs one timeout, not one per batch until it is skipped.
        failing = {node for node, streak in self.streak.items() if streak}
        for avoid in (refused | failed | failing, refused | failed, refused):
            for tier in self.tiers:
                candidates = [h for h in tier if self._usable(h) and h.node not in avoid]
                if candidates:
                    return candidates[turn % len(candidates)]
        return None

    def _tried(self, cid: Cid) -> list[str]:
        return sorted(self.refused.get(cid, set()) | self.failed.get(cid, set()))

    def _skip(self, node: str, reason: str) -> None:
        stats = self.result.holders[node]
        if not stats.skipped:
            stats.skipped = True
            stats.reason = reason
            _log.warning(
                "skipping holder %s while fetching %s: %s", node, to_str(self.root), reason
            )

    def _new_children(self, cid: Cid, block: bytes | memoryview) -> list[Cid]:
        """The children of a block not seen before, now marked seen, with their sizes noted."""
        codec = codec_of(cid)
        if codec == RAW:
            return []
        try:
            if codec != DAG_PB:
                raise ValueError(f"codec 0x{codec:x} is not walked")
            links = decode_node(block).links
        except ValueError as exc:
            raise StoreError(
                f"cannot follow the links of block {to_str(cid)} of {to_str(self.root)}: {exc}; "
                "only UnixFS (dag-pb and raw) DAGs can be fetched"
            ) from None
        fresh: list[Cid] = []
        for link in links:
            child = link.hash
            if child in self.seen:
                continue
            self.seen.add(child)
            fresh.append(child)
            if link.tsize is not None:
                self.sizes[child] = min(link.tsize, UNKNOWN_SIZE)
        return fresh

    async def _accept(self, batch: Batch, cid: Cid, block: bytes) -> bool:
        """Verify and store one received block; False when its bytes do not match ``cid``."""
        # Hashing and writing release the GIL: a thread keeps the event loop receiving.
        good = await in_thread(self._verify_and_put, cid, block)
        if not good:
            _log.warning(
                "holder %s served block %s with bytes that do not match it",
                batch.holder.node,
                to_str(cid),
            )
            return False
        self._stored(batch, cid, block)
        return True

    def _stored(self, batch: Batch, cid: Cid, block: bytes) -> None:
        batch.received.add(cid)
        self.result.blocks_fetched += 1
        self.result.bytes_fetched += len(block)
        # Children join the walk when the batch settles; marked seen now so no one queues them.
        batch.children.extend(self._new_children(cid, block))
        if self.progress is not None:
            self.progress(self.result.blocks_fetched, self.result.bytes_fetched)

    def _verify_and_put_received(self, cid: Cid, data: bytearray) -> bytes | None:
        """The block once verified and stored; None when it does not match.

        The buffer the socket wrote into is stored and returned as it is: a copy into ``bytes``
        cost 0.5 CPU-s per GiB here (fresh pages), as much as the write. Nothing writes to it
        after it was received, so it is as immutable as bytes for the store.
        """
        block = cast(bytes, data)
        return block if self._verify_and_put(cid, block) else None

    def _verify_and_put(self, cid: Cid, block: bytes) -> bool:
        if not matches(cid, block):
            return False
        self.store.put(cid, block)
        return True
