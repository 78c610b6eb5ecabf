"""Fetching a DAG from the nodes that hold it: the requesting side of the block exchange.

This module owns ``fetch_dag``: how a node gets every block below a root from its holders,
verified, into a local store. It does not pin (the caller pins once the call returns).

The steps:

1. Walk the DAG from the root. A block already in the store is not fetched: dag-pb blocks are
   read locally (verified) to learn their children, raw blocks have none. This is what makes an
   interrupted fetch resume where it stopped.
2. Queue the absent blocks and send them in batches (``batch`` CIDs, ``batch_bytes`` bytes per
   request), at most ``window`` batches in flight, to holders ordered nearest first relative to
   ``near`` (same host, same zone, same region, then the others); batches rotate over equally
   near holders, and a holder that times out is asked again only when no other is left.
3. Verify every block received against its CID and store it at once; a dag-pb block's children
   join the walk. A holder that serves a block whose bytes do not match is skipped for the rest of
   the fetch and reported. A CID a holder does not have goes to the next holder.
4. Bulk bytes go over the holder's block stream (``cim_place.cluster.exchange.stream``) when it
   has one: the first batch for a holder asks it for a stream grant on NATS (the holder checks
   access as for any block request; a refusal is ``AccessDeniedError``), then that holder's
   batches are pipelined on one TCP connection, still verified block by block. A holder without
   a stream, a connection that cannot be made or that breaks, sends the remaining blocks over
   NATS request/reply (logged once per holder, counted in ``HolderStats.fallbacks``).
5. Return when the whole DAG is present; raise ``BlockUnavailableError`` naming the first CID
   that no holder could supply, or ``AccessDeniedError`` at once when a holder says that this
   requester may not read the root (every request names the root it fetches for).

Here are the walk and the dispatch of batches; ``fetch_model`` holds what callers pass and get
back (holders, labels, the result), ``fetch_state`` the shared state and holder choice,
``fetch_stream`` and ``fetch_nats`` the two transfer paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from cim_place.cluster.exchange.block_wire import End, decode_reply, encode_request
from cim_place.cluster.exchange.fetch_model import (
    BlockUnavailableError,
    FetchResult,
    Holder,
    Labels,
)
from cim_place.cluster.exchange.fetch_nats import NatsPath
from cim_place.cluster.exchange.fetch_state import UNKNOWN_SIZE, Batch, in_thread
from cim_place.cluster.exchange.fetch_stream import StreamPath
from cim_place.cluster.exchange.ratelimit import Throttle
from cim_place.cluster.nats.security import AccessDeniedError
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import CorruptBlockError, ProtocolError
from cim_place.interfaces import BlockStore
from cim_place.objectstore.cid import RAW, Cid, codec_of, to_str

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "fetch_dag",
    "wait_for_holder",
]

_log = logging.getLogger(__name__)

DEFAULT_WINDOW = 4
DEFAULT_BATCH = 32
# nats-server disconnects a client as a slow consumer once 64 MB wait for it: keep the bytes in
# flight (window x batch_bytes) well below that.
DEFAULT_BATCH_BYTES = 8 << 20
# CIDs looked up in the local store per worker-thread call, between dispatches of batches.
_LOOKUP_CHUNK = 256
DEFAULT_TIMEOUT = 10.0
# A holder that fails this many requests in a row (timeouts, lost messages, refusals) is dropped.
_MAX_HOLDER_FAILURES = 3


class _Fetch(StreamPath, NatsPath):
    """One fetch: the walk of the DAG and the dispatch of batches to holders."""

    # -- the walk --
    async def _expand_local(self) -> None:
        """Resolve some queued CIDs against the local store; absent ones become wanted.

        The store is read in a worker thread (a resumed fetch reads every present dag-pb
        block); the fetch's state is only changed here, on the event loop.
        """
        cids = [self.walk.popleft() for _ in range(min(len(self.walk), _LOOKUP_CHUNK))]
        found = await in_thread(self._look_up, cids)
        for cid, block in found:
            if block is None:
                self.wanted.append(cid)
                continue
            self.result.blocks_present += 1
            self.walk.extend(self._new_children(cid, block))

    def _look_up(self, cids: list[Cid]) -> list[tuple[Cid, bytes | None]]:
        """(cid, block) per CID: None when absent, b"" for a present raw block (not read)."""
        found: list[tuple[Cid, bytes | None]] = []
        for cid in cids:
            if not self.store.has(cid):
                found.append((cid, None))
            elif codec_of(cid) == RAW:
                found.append((cid, b""))
            else:
                try:
                    found.append((cid, self.store.get(cid)))
                except CorruptBlockError:
                    # A local copy that rots is replaced: drop it and fetch it again.
                    _log.warning("local block %s is corrupt; fetching it again", to_str(cid))
                    self.store.delete(cid)
                    found.append((cid, None))
        return found

    def _next_batch(self) -> Batch | None:
        """Up to ``batch`` wanted CIDs for one holder; raises when a CID has no holder left."""
        turn = next(self.rotation)
        holder: Holder | None = None
        cids: list[Cid] = []
        postponed: list[Cid] = []
        size = 0
        while self.wanted and len(cids) < self.batch and size < self.batch_bytes:
            cid = self.wanted.popleft()
            choice = self._choose(cid, turn)
            if choice is None:
                raise BlockUnavailableError(cid, self.root, self._tried(cid))
            if holder is None:
                holder = choice
            if choice.node != holder.node:
                postponed.append(cid)
                continue
            cids.append(cid)
            size += self.sizes.get(cid, UNKNOWN_SIZE)
        self.wanted.extendleft(reversed(postponed))
        if holder is None:
            return None
        return Batch(holder, cids)

    # -- the exchange --
    async def run(self) -> FetchResult:
        started = time.monotonic()
        self.inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(
            f"{self.inbox}.*",
            cb=self._on_reply,
            # Unbounded: the window bounds what can be outstanding (0 disables nats-py's limits).
            pending_msgs_limit=0,
            pending_bytes_limit=0,
        )
        running: set[asyncio.Task[Batch]] = set()
        try:
            while True:
                if self.walk:
                    await self._expand_local()
                while self.wanted and len(running) < self.window:
                    batch = self._next_batch()
                    if batch is None:
                        break
                    running.add(asyncio.create_task(self._request(batch)))
                if not running:
                    if not self.walk and not self.wanted:
                        break
                    continue
                if self.walk:
                    # Local work left: settle what is done, but do not wait for the network.
                    done = {task for task in running if task.done()}
                else:
                    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    running.discard(task)
                    self._settle(task.result())
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            for session in self.sessions.values():
                if session is not None:
                    await session.client.close()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _settle(self, batch: Batch) -> None:
        stats = self.result.holders[batch.holder.node]
        stats.requests += 1
        if batch.denied:
            # Access is the object's policy, not this holder's state: another holder would
            # refuse as well, so the fetch ends here with the holder's reason.
            raise AccessDeniedError(f"{batch.denied} (refused by node {batch.holder.node})")
        stats.missing += len(batch.missing)
        for cid in batch.children:
            self.walk.append(cid)
        if batch.failed:
            stats.failures += 1
            if not stats.skipped:
                stats.reason = batch.failed
            self.streak[batch.holder.node] = self.streak.get(batch.holder.node, 0) + 1
            if batch.absent or self.streak[batch.holder.node] >= _MAX_HOLDER_FAILURES:
                # No responders: no agent serves that node at all, asking again is pointless.
                self._skip(batch.holder.node, f"{stats.failures} failed requests: {batch.failed}")
        else:
            self.streak[batch.holder.node] = 0
        if batch.corrupt:
            self._skip(batch.holder.node, "served a block whose bytes do not match its CID")
        node = batch.holder.node
        missing = set(batch.missing)
        for cid in batch.cids:
            if cid in batch.received:
                continue
            if cid in missing:
                self.refused.setdefault(cid, set()).add(node)
            else:
                self.failed.setdefault(cid, set()).add(node)
            self.wanted.append(cid)

    async def _request(self, batch: Batch) -> Batch:
        if not self.use_stream:
            return await self._request_nats(batch)
        try:
            session = await self._session_for(batch.holder)
        except AccessDeniedError as exc:
            batch.denied = str(exc)
            return batch
        if session is None:
            return await self._request_nats(batch)
        if await self._request_stream(session, batch):
            return batch
        # The stream broke: what it did not deliver goes over NATS.
        answered = batch.received | set(batch.missing)
        rest = Batch(batch.holder, [cid for cid in batch.cids if cid not in answered])
        if rest.cids:
            await self._request_nats(rest)
            batch.received |= rest.received
            batch.missing += rest.missing
            batch.children += rest.children
            batch.failed, batch.corrupt, batch.denied = rest.failed, rest.corrupt, rest.denied
            batch.absent = rest.absent
        return batch


async def wait_for_holder(
    nc: Any,
    node: str,
    *,
    subjects: Subjects | None = None,
    timeout: float = 5.0,
    interval: float = 0.1,
) -> bool:
    """True once ``node``'s BlockServer answers an empty request from here, False on timeout.

    A holder's subscription reaches other leaves through the hub asynchronously; an agent that
    has just started (or a test) can use this to know that requests will find it.
    """
    subject = (subjects if subjects is not None else Subjects()).block_get(node)
    deadline = time.monotonic() + timeout
    probe = encode_request([])
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            msg = await nc.request(subject, probe, timeout=min(interval * 5, left))
            _, records = decode_reply(msg.data)
            if any(isinstance(r, End) for r in records):
                return True
        except (TimeoutError, ProtocolError):
            pass
        except Exception as exc:  # NoRespondersError and the like: not there yet
            _log.debug("probing holder %s: %s", node, exc)
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def fetch_dag(
    nc: Any,
    root: Cid,
    holders: Sequence[Holder],
    store: BlockStore,
    *,
    window: int = DEFAULT_WINDOW,
    batch: int = DEFAULT_BATCH,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    subjects: Subjects | None = None,
    near: Labels | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    bandwidth: Throttle | None = None,
    progress: Callable[[int, int], None] | None = None,
    stream: bool = True,
    stream_tls: ssl.SSLContext | None = None,
) -> FetchResult:
    """Make the whole DAG under ``root`` present in ``store``, fetching what is absent.

    ``holders`` are the nodes believed to hold it (from the locations projection); ``near`` is
    the local node's labels, to prefer near holders. ``window`` batches are in flight at a time,
    each of at most ``batch`` CIDs and about ``batch_bytes`` bytes (block sizes are known from
    the parents' links); ``timeout`` bounds the wait for each reply message. ``bandwidth`` (shared
    between fetches if wanted) caps the receive rate; ``progress(blocks, bytes)`` is called after
    each stored block. ``stream`` False keeps every block on NATS (for comparison and tests);
    ``stream_tls`` verifies holders whose stream uses TLS (default: the system's trust store).

    Returns once every block is present (the caller pins the root then). Raises
    ``BlockUnavailableError`` when some block has no holder left, ``AccessDeniedError`` when a
    holder refuses this requester the root, ``StoreFullError`` from the
    store, ``StoreError`` for a DAG that is not UnixFS. Blocks stored before an error or a
    cancellation stay, so a new call fetches only what is still absent.
    """
    fetch = _Fetch(
        nc,
        root,
        holders,
        store,
        window=window,
        batch=batch,
        batch_bytes=batch_bytes,
        subjects=subjects if subjects is not None else Subjects(),
        near=near,
        timeout=timeout,
        bandwidth=bandwidth,
        progress=progress,
        stream=stream,
        stream_tls=stream_tls,
    )
    return await fetch.run()
