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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

from cim_place.cluster.exchange.blocks import (
    MAX_BLOCK_SIZE,
    MAX_REQUEST_CIDS,
    End,
    Grant,
    Missing,
    Part,
    ProtocolError,
    Status,
    decode_reply,
    encode_grant_request,
    encode_request,
)
from cim_place.cluster.exchange.ratelimit import BandwidthLimit, Throttle
from cim_place.cluster.exchange.stream import Block, StreamClient
from cim_place.cluster.nats.security import AccessDeniedError
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import CorruptBlockError, StoreError, TransportError
from cim_place.interfaces import BlockStore
from cim_place.objectstore.cid import DAG_PB, RAW, Cid, codec_of, matches, to_str
from cim_place.objectstore.dagpb import decode_node

__all__ = [
    "AccessDeniedError",
    "BandwidthLimit",
    "BlockUnavailableError",
    "FetchResult",
    "Holder",
    "HolderStats",
    "Labels",
    "fetch_dag",
    "order_holders",
    "request_timeout",
    "wait_for_holder",
]

_log = logging.getLogger(__name__)

STREAM_CONNECT_TIMEOUT = 3.0
"""Seconds to connect to a holder's block stream and be welcomed: the holder just granted on
NATS, so it is alive; an address a firewall drops costs this long before that holder falls
back to NATS, not the whole fetch timeout."""
_P = ParamSpec("_P")
_T = TypeVar("_T")

DEFAULT_WINDOW = 4
DEFAULT_BATCH = 32
# nats-server disconnects a client as a slow consumer once 64 MB wait for it: keep the bytes in
# flight (window x batch_bytes) well below that.
DEFAULT_BATCH_BYTES = 8 << 20
# CIDs looked up in the local store per worker-thread call, between dispatches of batches.
_LOOKUP_CHUNK = 256
# The size assumed for a block whose size no parent link told (the root, internal nodes).
_UNKNOWN_SIZE = 1 << 20
DEFAULT_TIMEOUT = 10.0
MIN_TIMEOUT = 3.0
"""The shortest wait for a reply :func:`request_timeout` gives: below it a busy but live holder
(a loaded machine, a large block) would be taken for a dead one."""
# A holder that fails this many requests in a row (timeouts, lost messages, refusals) is dropped.
_MAX_HOLDER_FAILURES = 3
# Blocks received on a stream whose verification and write may run in threads at once: enough to
# keep the socket read while hashing, few enough to bound memory (blocks are at most 4 MiB).
_VERIFY_AHEAD = 8


def request_timeout(grace: float) -> float:
    """The wait for each reply that lets a fetch leave a holder that stopped answering within
    ``grace`` seconds (the heartbeat grace, :func:`cim_place.cluster.state.nodes.heartbeat_grace`).

    A dead holder costs a fetch at most two waits: its stream grant request, then the NATS
    request of the same batch. After that first failure the fetch asks the other holders for
    everything (a holder with failed requests is asked again only when no other is left), so
    the transfer goes on elsewhere. Hence half the grace, but never below ``MIN_TIMEOUT``.
    """
    return max(MIN_TIMEOUT, grace / 2)


class BlockUnavailableError(TransportError):
    """No holder could supply a block of the DAG being fetched."""

    def __init__(self, cid: Cid, root: Cid, tried: Sequence[str]) -> None:
        self.cid = cid
        self.root = root
        self.tried = list(tried)
        who = ", ".join(self.tried) if self.tried else "none (no usable holder was given)"
        super().__init__(
            f"block {to_str(cid)} of {to_str(root)} is not available from any holder "
            f"(tried: {who}); check that a holder's agent is running and still has it "
            "(`cim-place status`), then fetch again: blocks already fetched are kept"
        )


@dataclass(frozen=True, slots=True)
class Labels:
    """Where a node is: its failure-domain labels (empty: unknown)."""

    region: str = ""
    zone: str = ""
    host: str = ""


@dataclass(frozen=True, slots=True)
class Holder:
    """A node that holds the DAG (or part of it) and serves it on ``block_get(node)``."""

    node: str
    region: str = ""
    zone: str = ""
    host: str = ""


@dataclass(slots=True)
class HolderStats:
    """What one holder did during a fetch."""

    blocks: int = 0
    bytes: int = 0
    requests: int = 0
    missing: int = 0
    """CIDs it answered as missing."""
    corrupt: int = 0
    """Blocks it sent whose bytes did not match their CID (it is then skipped)."""
    failures: int = 0
    """Requests that timed out, lost messages, or were refused."""
    skipped: bool = False
    """True when the holder was dropped for the rest of the fetch."""
    reason: str = ""
    """Why it was skipped; while it is not, why its last request failed ("" when none did)."""
    stream_blocks: int = 0
    """Of ``blocks``, those that came over the holder's block stream (the rest over NATS)."""
    stream_bytes: int = 0
    fallbacks: int = 0
    """1 when this holder's blocks went over NATS although streams were wanted: it offered no
    stream, the connection failed, or it broke mid-way (``fallback`` says why)."""
    fallback: str = ""


@dataclass(slots=True)
class FetchResult:
    """The outcome of a complete fetch: every block below ``root`` is now in the store."""

    root: Cid
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_present: int = 0
    """Blocks that were already in the store (not fetched again)."""
    holders: dict[str, HolderStats] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def corrupt_holders(self) -> list[str]:
        """Holders that served at least one mismatching block."""
        return [node for node, stats in self.holders.items() if stats.corrupt]


def proximity(holder: Holder, near: Labels | None) -> int:
    """0 same host, 1 same zone, 2 same region, 3 anything else (or no local labels).

    Labels are compared as paths, as placement does: a zone is named within its region and a
    host within its zone; a missing region or zone is the unnamed one (""), a missing host is a
    host of its own, so it is never "the same host".
    """
    if near is None:
        return 3
    if holder.region != near.region:
        return 3
    if holder.zone != near.zone:
        return 2
    if not near.host or holder.host != near.host:
        return 1
    return 0


def order_holders(holders: Sequence[Holder], near: Labels | None) -> list[list[Holder]]:
    """Holders grouped in tiers, nearest tier first; duplicates (same node) removed.

    Inside a tier the order is the given one; fetch rotates over a tier to spread the load.
    """
    tiers: dict[int, list[Holder]] = {}
    seen: set[str] = set()
    for holder in holders:
        if holder.node in seen:
            continue
        seen.add(holder.node)
        tiers.setdefault(proximity(holder, near), []).append(holder)
    return [tiers[rank] for rank in sorted(tiers)]


async def _in_thread(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
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
class _Batch:
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


class _Session:
    """One holder's block stream during a fetch: answers arrive in the order GETs were sent,
    so each batch reads its answer after the previous batch has read its own."""

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.last: asyncio.Future[None] | None = None
        self.broken = ""
        """Why the connection is unusable ("" while it works)."""
        self.corrupt = False


class _Fetch:
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
        self.sessions: dict[str, _Session | None] = {}
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

    # -- the walk --
    async def _expand_local(self) -> None:
        """Resolve some queued CIDs against the local store; absent ones become wanted.

        The store is read in a worker thread (a resumed fetch reads every present dag-pb
        block); the fetch's state is only changed here, on the event loop.
        """
        cids = [self.walk.popleft() for _ in range(min(len(self.walk), _LOOKUP_CHUNK))]
        found = await _in_thread(self._look_up, cids)
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
                self.sizes[child] = min(link.tsize, _UNKNOWN_SIZE)
        return fresh

    def _next_batch(self) -> _Batch | None:
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
            size += self.sizes.get(cid, _UNKNOWN_SIZE)
        self.wanted.extendleft(reversed(postponed))
        if holder is None:
            return None
        return _Batch(holder, cids)

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
        running: set[asyncio.Task[_Batch]] = set()
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

    def _settle(self, batch: _Batch) -> None:
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

    async def _on_reply(self, msg: Any) -> None:
        queue = self.queues.get(msg.subject)
        if queue is not None:
            # nats-server answers a request nobody subscribes to with an empty 503 status
            # message; a reply message is never empty, so b"" stands for "no responders".
            queue.put_nowait(msg.data or b"")

    async def _request(self, batch: _Batch) -> _Batch:
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
        rest = _Batch(batch.holder, [cid for cid in batch.cids if cid not in answered])
        if rest.cids:
            await self._request_nats(rest)
            batch.received |= rest.received
            batch.missing += rest.missing
            batch.children += rest.children
            batch.failed, batch.corrupt, batch.denied = rest.failed, rest.corrupt, rest.denied
            batch.absent = rest.absent
        return batch

    # -- the block stream --
    async def _session_for(self, holder: Holder) -> _Session | None:
        """The holder's stream session, opened on first use; None: use NATS for this holder."""
        node = holder.node
        if node in self.sessions:
            return self.sessions[node]
        async with self.session_locks.setdefault(node, asyncio.Lock()):
            if node in self.sessions:
                return self.sessions[node]
            session: _Session | None = None
            why = ""
            try:
                grant = await self._ask_grant(holder)
                if grant is None:
                    why = "it offers no block stream for this root"
                else:
                    client = await StreamClient.open(
                        grant.address,
                        grant.token,
                        timeout=min(self.timeout, STREAM_CONNECT_TIMEOUT),
                        tls=self.stream_tls,
                    )
                    session = _Session(client)
            except AccessDeniedError:
                raise
            except (OSError, TimeoutError, ProtocolError) as exc:
                why = f"its block stream cannot be used: {exc!r}"
            self.sessions[node] = session
            if session is None:
                self._fall_back(node, why)
            return session

    async def _ask_grant(self, holder: Holder) -> Grant | None:
        """A stream grant from ``holder``; None when it has none to give (or does not answer:
        the NATS path then reports that); raises AccessDeniedError when it refuses."""
        subject = self.subjects.block_get(holder.node)
        try:
            msg = await self.nc.request(
                subject, encode_grant_request(self.root), timeout=self.timeout
            )
            _, records = decode_reply(msg.data)
        except Exception as exc:  # timeouts, garbage, no responders: the NATS path says it better
            _log.debug("stream grant from %s: %r", holder.node, exc)
            return None
        grant: Grant | None = None
        for record in records:
            if isinstance(record, Grant):
                grant = record
            elif isinstance(record, End) and record.status == Status.NOT_ALLOWED:
                raise AccessDeniedError(record.reason or "not allowed")
        return grant

    def _fall_back(self, node: str, why: str) -> None:
        stats = self.result.holders[node]
        if stats.fallbacks:
            return
        stats.fallbacks = 1
        stats.fallback = why
        _log.info("fetching %s from %s over NATS: %s", to_str(self.root), node, why)

    async def _request_stream(self, session: _Session, batch: _Batch) -> bool:
        """Fetch ``batch`` over the stream; False when the stream broke (the caller falls back
        for what was not delivered)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous, session.last = session.last, turn
        try:
            if not session.broken and not session.corrupt:
                session.client.send_get(batch.cids)
            if previous is not None:
                await asyncio.shield(previous)
            if session.corrupt:
                batch.failed = "holder skipped: it served a corrupt block"
                return True
            if session.broken:
                return False
            return await self._receive_stream(session, batch, turn)
        except asyncio.CancelledError:
            # Its GET was sent but its answer will not be read: the connection is out of step.
            session.broken = session.broken or "a batch was cancelled"
            raise
        finally:
            if not turn.done():
                turn.set_result(None)

    async def _receive_stream(
        self, session: _Session, batch: _Batch, turn: asyncio.Future[None]
    ) -> bool:
        wanted = set(batch.cids)
        answered: set[Cid] = set()
        checks: list[tuple[Cid, int, asyncio.Future[bytes | None]]] = []
        broken = ""
        try:
            while True:
                record = await session.client.read(self.timeout)
                if isinstance(record, End):
                    if record.status == Status.NOT_ALLOWED:
                        batch.denied = record.reason or "not allowed"
                        batch.failed = f"request refused (NOT_ALLOWED: {record.reason})"
                    elif record.status != Status.OK:
                        broken = f"request refused ({record.status.name}: {record.reason})"
                    break
                assert not isinstance(record, Grant)
                if record.cid not in wanted or record.cid in answered:
                    raise ProtocolError(f"sent block {to_str(record.cid)}, not asked for")
                answered.add(record.cid)
                if isinstance(record, Missing):
                    batch.missing.append(record.cid)
                    continue
                assert isinstance(record, Block)
                if self.bandwidth is not None:
                    await self.bandwidth.take(len(record.data))
                # Hash and write in a thread while the next block is read from the socket.
                check = asyncio.ensure_future(
                    asyncio.to_thread(self._verify_and_put_received, record.cid, record.data)
                )
                checks.append((record.cid, len(record.data), check))
                running = [c[2] for c in checks if not c[2].done()]
                if len(running) >= _VERIFY_AHEAD:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        except (ProtocolError, OSError, EOFError, TimeoutError) as exc:
            broken = f"the block stream broke: {exc!r}"
        except asyncio.CancelledError:
            broken = "the fetch was cancelled mid-answer"
            raise
        finally:
            if broken:
                session.broken = broken
                await session.client.close()
            # The next batch may read the connection while these blocks are verified.
            if not turn.done():
                turn.set_result(None)
            corrupt = await self._finish_checks(batch, checks)
        if corrupt:
            session.corrupt = True
            await session.client.close()
        if broken and not corrupt:
            self._fall_back(batch.holder.node, broken)
            return False
        return True

    async def _finish_checks(
        self, batch: _Batch, checks: list[tuple[Cid, int, asyncio.Future[bytes | None]]]
    ) -> bool:
        """Wait for the verifications of a stream batch and account for them; True when a
        block did not match its CID. Threads are waited for even when cancelled, so nothing is
        written on the fetch's behalf after it ended."""
        stats = self.result.holders[batch.holder.node]
        cancelled = False
        corrupt = False
        for cid, size, check in checks:
            while not check.done():
                try:
                    await asyncio.shield(check)
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled or check.cancelled():
                continue
            block = check.result()  # StoreFullError and the like propagate
            if block is None:
                if not corrupt:
                    _log.warning(
                        "holder %s served block %s with bytes that do not match it",
                        batch.holder.node,
                        to_str(cid),
                    )
                stats.corrupt += 1
                batch.corrupt = True
                corrupt = True
                continue
            self._stored(batch, cid, block)
            stats.blocks += 1
            stats.bytes += size
            stats.stream_blocks += 1
            stats.stream_bytes += size
        if cancelled:
            raise asyncio.CancelledError
        return corrupt

    # -- the NATS path --
    async def _request_nats(self, batch: _Batch) -> _Batch:
        reply = f"{self.inbox}.{next(self.serial)}"
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queues[reply] = queue
        max_reply = int(getattr(self.nc, "max_payload", 0) or 0)
        try:
            await self.nc.publish(
                self.subjects.block_get(batch.holder.node),
                encode_request(batch.cids, max_reply=max_reply, root=self.root),
                reply=reply,
            )
            await self._receive(batch, queue)
        except TimeoutError:
            batch.failed = f"no reply within {self.timeout:g} s"
        except ProtocolError as exc:
            batch.failed = f"malformed reply: {exc}"
        finally:
            del self.queues[reply]
        return batch

    async def _receive(self, batch: _Batch, queue: asyncio.Queue[bytes]) -> None:
        wanted = set(batch.cids)
        partial: dict[Cid, bytearray] = {}
        expected = 0
        stats = self.result.holders[batch.holder.node]
        while True:
            data = await asyncio.wait_for(queue.get(), self.timeout)
            if not data:
                subject = self.subjects.block_get(batch.holder.node)
                batch.failed = f"no agent serves {subject} (no responders)"
                batch.absent = True
                return
            if self.bandwidth is not None:
                await self.bandwidth.take(len(data))
            seq, records = decode_reply(data)
            if seq != expected:
                batch.failed = f"reply message {expected} was lost (got {seq})"
                return
            expected += 1
            for record in records:
                if isinstance(record, End):
                    if record.status == Status.NOT_ALLOWED:
                        batch.denied = record.reason or "not allowed"
                        batch.failed = f"request refused (NOT_ALLOWED: {record.reason})"
                    elif record.status != Status.OK:
                        batch.failed = f"request refused ({record.status.name}: {record.reason})"
                    elif record.messages != expected:
                        batch.failed = f"reply of {record.messages} messages, got {expected}"
                    return
                if isinstance(record, Grant):
                    batch.failed = "sent a stream grant in answer to a block request"
                    return
                if record.cid not in wanted or record.cid in batch.received:
                    batch.failed = f"sent block {to_str(record.cid)}, which was not asked for"
                    return
                if isinstance(record, Missing):
                    batch.missing.append(record.cid)
                    continue
                block = self._assemble(record, partial)
                if block is None:
                    continue
                if not await self._accept(batch, record.cid, block):
                    stats.corrupt += 1
                    batch.corrupt = True
                    return
                stats.blocks += 1
                stats.bytes += len(block)

    def _assemble(self, part: Part, partial: dict[Cid, bytearray]) -> bytes | None:
        if part.total > MAX_BLOCK_SIZE:
            raise ProtocolError(f"block {to_str(part.cid)} claims {part.total} bytes")
        if part.offset == 0 and len(part.data) == part.total:
            return bytes(part.data)
        buffer = partial.get(part.cid)
        if buffer is None:
            if part.offset != 0:
                raise ProtocolError(f"block {to_str(part.cid)} starts at offset {part.offset}")
            buffer = partial[part.cid] = bytearray()
        if part.offset != len(buffer):
            raise ProtocolError(f"block {to_str(part.cid)}: part at {part.offset} out of order")
        buffer += part.data
        if len(buffer) < part.total:
            return None
        del partial[part.cid]
        return bytes(buffer)

    async def _accept(self, batch: _Batch, cid: Cid, block: bytes) -> bool:
        """Verify and store one received block; False when its bytes do not match ``cid``."""
        # Hashing and writing release the GIL: a thread keeps the event loop receiving.
        good = await _in_thread(self._verify_and_put, cid, block)
        if not good:
            _log.warning(
                "holder %s served block %s with bytes that do not match it",
                batch.holder.node,
                to_str(cid),
            )
            return False
        self._stored(batch, cid, block)
        return True

    def _stored(self, batch: _Batch, cid: Cid, block: bytes) -> None:
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
