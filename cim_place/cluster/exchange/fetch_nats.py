"""The NATS path of a fetch: batches as request/reply on the holder's block subject.

This module owns how :mod:`cim_place.cluster.exchange.fetch` asks a holder for a batch over core
NATS (``Subjects.block_get``): one shared inbox subscription routes reply messages to the batch
waiting for them, lost messages and "no responders" are noticed, blocks split into parts are
reassembled, and every block is verified before it is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cim_place.cluster.exchange.block_wire import (
    MAX_BLOCK_SIZE,
    End,
    Grant,
    Missing,
    Part,
    Status,
    decode_reply,
    encode_request,
)
from cim_place.cluster.exchange.fetch_state import Batch, FetchState
from cim_place.errors import ProtocolError
from cim_place.objectstore.cid import Cid, to_str

__all__ = ["NatsPath"]


class NatsPath(FetchState):
    """The NATS request/reply half of a fetch."""

    async def _on_reply(self, msg: Any) -> None:
        queue = self.queues.get(msg.subject)
        if queue is not None:
            # nats-server answers a request nobody subscribes to with an empty 503 status
            # message; a reply message is never empty, so b"" stands for "no responders".
            queue.put_nowait(msg.data or b"")

    async def _request_nats(self, batch: Batch) -> Batch:
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

    async def _receive(self, batch: Batch, queue: asyncio.Queue[bytes]) -> None:
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
