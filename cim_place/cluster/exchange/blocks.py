"""The holder side of the block exchange: the BlockServer that answers block requests.

This module owns ``BlockServer``, which serves a node's blocks on ``Subjects.block_get(node)`` in
the wire format of ``cim_place.cluster.exchange.block_wire`` (requests answered concurrently,
reads verified in worker threads, object access checked, stream grants handed out), the
``VolumeSet`` that serves every volume of an agent, the ``ServeStats`` counters, and
``read_served``, the read that both the NATS path and the block stream use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cim_place.cluster.exchange.block_wire import (
    MIN_REPLY,
    ReplyWriter,
    RequestTooLargeError,
    Status,
    StreamGranter,
    decode_grant_request,
    decode_request_for,
    is_grant_request,
)
from cim_place.cluster.nats.connection import flushed
from cim_place.cluster.nats.security import ReadAccess, requester_of
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import BlockNotFoundError, CorruptBlockError, ProtocolError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import Cid, to_str

__all__ = ["BlockServer", "ServeStats", "VolumeSet", "read_served"]

_log = logging.getLogger(__name__)


class VolumeSet:
    """A BlockSource over all of a node's volumes: each block is read from the first volume
    that has it, so one BlockServer serves every volume of its agent.

    A corrupt copy in one volume does not hide a good copy in another: the next one is tried,
    and the corruption is still raised when no volume has a good copy.
    """

    def __init__(self, volumes: Sequence[BlockSource]) -> None:
        self.volumes = list(volumes)

    def has(self, cid: Cid) -> bool:
        return any(volume.has(cid) for volume in self.volumes)

    def get(self, cid: Cid) -> bytes:
        corrupt: CorruptBlockError | None = None
        for volume in self.volumes:
            if not volume.has(cid):
                continue
            try:
                return volume.get(cid)
            except CorruptBlockError as exc:
                corrupt = exc
            except BlockNotFoundError:
                continue  # removed between has and get
        if corrupt is not None:
            raise corrupt
        raise BlockNotFoundError(to_str(cid))


@dataclass(slots=True)
class ServeStats:
    """Counters of a BlockServer, for metrics (monotonic since start)."""

    requests: int = 0
    blocks_served: int = 0
    bytes_served: int = 0
    messages_sent: int = 0
    missing: int = 0
    """CIDs asked for that this holder does not have (corrupt ones included)."""
    corrupt: int = 0
    """Local blocks that failed verification when read (reported as missing, never served)."""
    malformed: int = 0
    """Requests refused as garbage, oversized or of the wrong kind, or without a reply subject."""
    errors: int = 0
    """Requests that failed on the holder's side, and blocks it could not read (I/O errors)."""
    refused: int = 0
    """Requests refused by object access control (the requester may not read the root)."""
    corrupt_cids: list[Cid] = field(default_factory=list)
    """The most recent corrupt local blocks (the last 100), for a repair task."""
    on_corrupt: Callable[[Cid], None] | None = field(default=None, repr=False, compare=False)
    """Called (on the event loop) with each corrupt local block refused: the agent reports the
    replicas it damages."""

    def count_unservable(self, cid: Cid, problem: str) -> None:
        """Count (and log) a block ``read_served`` could not serve, with its ``problem``."""
        self.missing += 1
        if problem.startswith("corrupt"):
            self.corrupt += 1
            self.corrupt_cids = [*self.corrupt_cids[-99:], cid]
            _log.error("not serving block %s: %s", to_str(cid), problem)
            if self.on_corrupt is not None:
                self.on_corrupt(cid)
        elif problem != "absent":
            self.errors += 1
            _log.error("cannot read block %s to serve it: %s", to_str(cid), problem)


def read_served(store: BlockSource, cid: Cid) -> tuple[bytes | None, str]:
    """(block, "") or (None, why) for a block about to be served, on either path.

    Runs in a worker thread, so it only reads; a verified read (every BlockStore verifies) means
    a corrupt copy is never served.
    """
    try:
        return store.get(cid), ""
    except BlockNotFoundError:
        return None, "absent"
    except CorruptBlockError as exc:
        return None, f"corrupt: {exc}"
    except Exception as exc:
        # One unreadable block (I/O error, permissions) must not fail the whole request.
        return None, f"unreadable: {exc}"


class BlockServer:
    """Serves the blocks of one node's store on ``Subjects.block_get(node)``.

    Usage::

        server = BlockServer(nc, node="leaf-a", store=volume_store)
        await server.start()
        ...
        await server.stop()

    ``store.get`` must verify (every BlockStore does): a corrupt block is reported as missing
    to the requester, counted in ``stats.corrupt`` and logged. Requests are answered
    concurrently, at most ``concurrency`` at a time; reads run in a worker thread so that disk
    and hashing overlap with sending. Blocking reads of a large store never stall the event loop.
    """

    def __init__(
        self,
        nc: Any,
        node: str,
        store: BlockSource,
        *,
        subjects: Subjects | None = None,
        concurrency: int = 8,
        queue: str | None = None,
        access: ReadAccess | None = None,
        stream: StreamGranter | None = None,
    ) -> None:
        self.nc = nc
        self.node = node
        self.store = store
        self.subjects = subjects if subjects is not None else Subjects()
        self.subject = self.subjects.block_get(node)
        self.queue = queue
        # None: every block is served to anyone who can reach the subject (an open domain).
        self.access = access
        # None: no block stream; grant requests are answered "use NATS".
        self.stream = stream
        self.stats = ServeStats()
        # Told once per object read (a request that asks for the root itself, or a stream
        # grant) with the requester: demand counting, docs/DEMAND.md.
        self.on_read: Callable[[Cid, str | None], None] | None = None
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None

    @property
    def active(self) -> int:
        """Requests being answered right now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Subscribe; blocks are served from now until ``stop``. Idempotent."""
        if self._sub is not None:
            return
        kwargs: dict[str, Any] = {"cb": self._on_request}
        if self.queue:
            kwargs["queue"] = self.queue
        self._sub = await self.nc.subscribe(self.subject, **kwargs)
        # The local server knows the interest when this returns; other leaves learn it through
        # the hub a moment later (``fetch.wait_for_holder`` waits for that).
        await flushed(self.nc)

    async def stop(self) -> None:
        """Stop taking requests and wait for those being answered."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Any) -> None:
        # The subscription delivers one message at a time: take a slot, answer in a task.
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        try:
            await self._serve(msg)
        except Exception:
            self.stats.errors += 1
            _log.exception("block request on %s failed", self.subject)
        finally:
            self._slots.release()

    def _reply_limit(self, asked: int) -> int:
        limit = int(getattr(self.nc, "max_payload", 0) or (1 << 20))
        if asked:
            limit = min(limit, asked)
        return max(limit, MIN_REPLY)

    async def _serve(self, msg: Any) -> None:
        self.stats.requests += 1
        reply = msg.reply
        if not reply:
            self.stats.malformed += 1
            _log.warning("block request on %s without a reply subject: ignored", self.subject)
            return
        if is_grant_request(msg.data):
            await self._serve_grant(msg)
            return
        try:
            cids, asked, root = decode_request_for(msg.data)
        except ProtocolError as exc:
            self.stats.malformed += 1
            status = Status.TOO_LARGE if isinstance(exc, RequestTooLargeError) else Status.MALFORMED
            _log.warning("malformed block request on %s: %s", self.subject, exc)
            await self._send(reply, ReplyWriter(self._reply_limit(0)).end(status, str(exc)))
            return
        writer = ReplyWriter(self._reply_limit(asked))
        if self.access is not None and await self._refused(msg.reply, root, cids, writer):
            return
        if self.on_read is not None and root is not None and root in cids:
            self.on_read(root, requester_of(reply))
        # Read ahead one block in a thread while the previous one is being sent.
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[tuple[bytes | None, str]] | None = None
        for index, cid in enumerate(cids):
            if pending is None:
                pending = loop.run_in_executor(None, read_served, self.store, cid)
            data, problem = await pending
            pending = None
            if index + 1 < len(cids):
                pending = loop.run_in_executor(None, read_served, self.store, cids[index + 1])
            if data is None:
                self.stats.count_unservable(cid, problem)
                await self._send(reply, writer.missing(cid))
                continue
            await self._send(reply, writer.block(cid, data))
            self.stats.blocks_served += 1
            self.stats.bytes_served += len(data)
        await self._send(reply, writer.end())

    async def _serve_grant(self, msg: Any) -> None:
        writer = ReplyWriter(self._reply_limit(0))
        try:
            root = decode_grant_request(msg.data)
        except ProtocolError as exc:
            self.stats.malformed += 1
            _log.warning("malformed grant request on %s: %s", self.subject, exc)
            await self._send(msg.reply, writer.end(Status.MALFORMED, str(exc)))
            return
        if self.stream is None:
            await self._send(msg.reply, writer.end(Status.OK, "no block stream on this node"))
            return
        requester = requester_of(msg.reply)
        if self.access is not None:
            if self.access.pin_of(root) is None:
                # As for block requests: not pinned here, so its readers are unknown here.
                await self._send(msg.reply, writer.end(Status.OK, "not pinned on this node"))
                return
            reason = await asyncio.to_thread(self.access.check, requester, root, [])
            if reason is not None:
                self.stats.refused += 1
                _log.info("refused stream grant on %s: %s", self.subject, reason)
                await self._send(msg.reply, writer.end(Status.NOT_ALLOWED, reason))
                return
        elif not await asyncio.to_thread(self.store.has, root):
            # The stream serves only what lies under the root in the local DAG; without the
            # root here it would serve nothing, while the NATS path serves what this node has.
            await self._send(msg.reply, writer.end(Status.OK, "the root is not on this node"))
            return
        if self.on_read is not None:
            self.on_read(root, requester)
        await self._send(msg.reply, writer.grant(self.stream.grant(root, requester)))
        await self._send(msg.reply, writer.end())

    async def _refused(
        self, reply: str, root: Cid | None, cids: list[Cid], writer: ReplyWriter
    ) -> bool:
        """Answer a request that access control refuses; False when it is allowed."""
        assert self.access is not None
        requester = requester_of(reply)
        if root is not None and self.access.pin_of(root) is None:
            # Not pinned here: its readers are unknown on this node, so it is not served from
            # here; MISSING sends the requester on to the next holder.
            for cid in cids:
                self.stats.missing += 1
                await self._send(reply, writer.missing(cid))
            await self._send(reply, writer.end())
            return True
        # Checking DAG membership reads blocks: off the event loop.
        reason = await asyncio.to_thread(self.access.check, requester, root, cids)
        if reason is None:
            return False
        self.stats.refused += 1
        _log.info("refused block request on %s: %s", self.subject, reason)
        await self._send(reply, writer.end(Status.NOT_ALLOWED, reason))
        return True

    async def _send(self, reply: str, messages: Iterator[bytes]) -> None:
        for message in messages:
            await self.nc.publish(reply, message)
            self.stats.messages_sent += 1
