"""Who has a root: the scatter-gather query that finds the nodes holding content pinned.

This module owns the ``<prefix>.has`` subject (``Subjects.has``), shared by every agent. A
fetcher publishes one request naming the roots it looks for and collects the replies for a short
while; each agent that holds at least one of them *pinned* (complete, by the store's promise)
answers with those roots, its node id and its labels, so the fetcher can order the holders
nearest first (``cim_place.cluster.exchange.fetch_model.order_holders``). Agents that hold none
of them stay silent, which keeps the fan-in proportional to the number of holders, not of nodes.

Wire format, DAG-CBOR (``cim_place.objectstore.dagcbor``), CIDs as links::

    request  {"v": 1, "cids": [Link, ...]}                      at most MAX_QUERY_CIDS
             {"v": 1, "cids": [Link, ...], "blocks": true}     (a block query, see below)
    reply    {"v": 1, "node": str, "labels": {str: str}, "roots": [Link, ...]}
             ... "blocks": [Link, ...]                          (only to a block query)

A *block query* (:func:`find_block_holders`) asks also for CIDs held as a block, not pinned
as a root: the gateway's way to find a child block that a verifying client names alone. A
responder given its ``blocks`` (an open domain's agent; where object access is enforced a
block is served only under a pinned root, so it is not offered) answers those in ``blocks``;
a responder of an older version ignores the flag and answers pinned roots only.

A request that cannot be decoded, names too many CIDs or has no reply subject is counted in
``HasStats.malformed`` and ignored: a responder never raises on bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.nats.connection import flushed
from cim_place.cluster.nats.subjects import Subjects
from cim_place.errors import InvalidCidError, ProtocolError, StoreError
from cim_place.interfaces import BlockSource, PinIndex
from cim_place.objectstore import dagcbor
from cim_place.objectstore.cid import RAW, Cid, codec_of, split

__all__ = [
    "MAX_QUERY_CIDS",
    "HasStats",
    "Holder",
    "HolderResponder",
    "decode_answer",
    "decode_query",
    "encode_answer",
    "encode_query",
    "find_block_holders",
    "find_holders",
    "who_has",
]

_log = logging.getLogger(__name__)

VERSION = 1
MAX_QUERY_CIDS = 1024
"""The most roots one query may name; larger queries are ignored as malformed."""
MAX_QUERY_BYTES = 128 * 1024
# Below this many roots a lookup runs on the event loop (an indexed SQLite read each); above,
# in a worker thread so a large query does not stall the agent's other subscriptions.
_INLINE_LOOKUPS = 16
DEFAULT_TIMEOUT = 0.5


class QueryError(ProtocolError):
    """A who-has request or reply that does not follow the wire format."""


# -- wire format ---------------------------------------------------------------------------------


def encode_query(roots: Sequence[Cid], *, blocks: bool = False) -> bytes:
    if len(roots) > MAX_QUERY_CIDS:
        raise ValueError(f"{len(roots)} roots in one who-has query; at most {MAX_QUERY_CIDS}")
    query: dict[str, dagcbor.Value] = {"v": VERSION, "cids": [dagcbor.Link(c) for c in roots]}
    if blocks:
        query["blocks"] = True
    return dagcbor.encode(query)


def _links(value: dagcbor.Value, what: str) -> list[Cid]:
    if not isinstance(value, list):
        raise QueryError(f"{what} is not a list")
    if len(value) > MAX_QUERY_CIDS:
        raise QueryError(f"{what} names {len(value)} CIDs; at most {MAX_QUERY_CIDS}")
    cids: list[Cid] = []
    for item in value:
        if not isinstance(item, dagcbor.Link):
            raise QueryError(f"{what} holds a {type(item).__name__}, not a CID link")
        try:
            split(item.cid)
        except InvalidCidError as exc:
            raise QueryError(f"{what} holds an invalid CID: {exc}") from None
        cids.append(item.cid)
    return cids


def _map(data: bytes, what: str) -> dict[str, dagcbor.Value]:
    if len(data) > MAX_QUERY_BYTES:
        raise QueryError(f"{what} of {len(data)} bytes; at most {MAX_QUERY_BYTES}")
    try:
        value = dagcbor.decode(bytes(data))
    except (dagcbor.DagCborError, InvalidCidError, ValueError) as exc:
        raise QueryError(f"{what} is not DAG-CBOR: {exc}") from None
    if not isinstance(value, dict):
        raise QueryError(f"{what} is not a map")
    if value.get("v") != VERSION:
        raise QueryError(f"{what} has version {value.get('v')!r}; this node speaks {VERSION}")
    return value


def decode_query(data: bytes) -> list[Cid]:
    """The roots a who-has request asks about; raises QueryError saying what is wrong."""
    return decode_block_query(data)[0]


def decode_block_query(data: bytes) -> tuple[list[Cid], bool]:
    """(the CIDs asked about, whether blocks held unpinned count); raises QueryError."""
    value = _map(data, "who-has request")
    return _links(value.get("cids"), "who-has request 'cids'"), value.get("blocks") is True


def encode_answer(
    node: str, labels: Mapping[str, str], roots: Sequence[Cid], blocks: Sequence[Cid] = ()
) -> bytes:
    answer: dict[str, dagcbor.Value] = {
        "v": VERSION,
        "node": node,
        "labels": dict(labels),
        "roots": [dagcbor.Link(cid) for cid in roots],
    }
    if blocks:
        answer["blocks"] = [dagcbor.Link(cid) for cid in blocks]
    return dagcbor.encode(answer)


def decode_answer(data: bytes) -> tuple[str, dict[str, str], list[Cid]]:
    """(node, labels, roots) of a who-has reply; raises QueryError saying what is wrong."""
    value = _map(data, "who-has reply")
    node = value.get("node")
    labels = value.get("labels")
    if not isinstance(node, str) or not node:
        raise QueryError("who-has reply without a node id")
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise QueryError(f"who-has reply of {node} has labels that are not strings")
    text_labels = {key: value for key, value in labels.items() if isinstance(value, str)}
    return node, text_labels, _links(value.get("roots"), "who-has reply 'roots'")


def decode_block_answer(data: bytes) -> tuple[str, dict[str, str], list[Cid], list[Cid]]:
    """(node, labels, pinned roots, blocks held unpinned) of a reply to a block query."""
    node, labels, roots = decode_answer(data)
    raw = dagcbor.decode(bytes(data))
    held = raw.get("blocks", []) if isinstance(raw, dict) else []
    return node, labels, roots, _links(held, "who-has reply 'blocks'")


def holder_of(node: str, labels: Mapping[str, str]) -> Holder:
    """The fetcher's view of a node: its id and the failure-domain labels it ranks by."""
    return Holder(
        node=node,
        region=labels.get("region", ""),
        zone=labels.get("zone", ""),
        host=labels.get("host", ""),
    )


# -- the agent side ------------------------------------------------------------------------------


@dataclass(slots=True)
class HasStats:
    """Counters of a HolderResponder, for metrics (monotonic since start)."""

    requests: int = 0
    answered: int = 0
    """Requests answered because at least one asked root is pinned here."""
    silent: int = 0
    """Well-formed requests for roots this node does not hold (no reply sent)."""
    malformed: int = 0
    """Requests ignored: undecodable, too large, or without a reply subject."""
    errors: int = 0
    """Requests that failed on this side (the pin index raised)."""


class HolderResponder:
    """Answers who-has queries on ``Subjects.has`` for the roots pinned in ``pins``.

    Usage::

        responder = HolderResponder(nc, "leaf-a", [volume.pins for volume in volumes],
                                    labels={"region": "eu", "zone": "eu-1", "host": "h1"})
        await responder.start()
        ...
        await responder.stop()

    ``pins`` is one PinIndex per volume of the agent; a root counts as held when any volume
    has it pinned. ``labels`` (region, zone, host and any other label of the node) travel in
    every answer; assign ``responder.labels`` to change them while running. ``blocks``, when
    given, answers block queries (see the module docstring) for the blocks it has.
    """

    def __init__(
        self,
        nc: Any,
        node: str,
        pins: PinIndex | Sequence[PinIndex],
        *,
        labels: Mapping[str, str] | None = None,
        subjects: Subjects | None = None,
        blocks: BlockSource | None = None,
    ) -> None:
        self.nc = nc
        self.node = node
        self.pins: list[PinIndex] = list(pins) if isinstance(pins, Sequence) else [pins]
        self.blocks = blocks
        self.labels: dict[str, str] = dict(labels or {})
        self.subjects = subjects if subjects is not None else Subjects()
        self.subject = self.subjects.has
        self.stats = HasStats()
        self._sub: Any = None

    async def start(self) -> None:
        """Subscribe; queries are answered from now until ``stop``. Idempotent."""
        if self._sub is not None:
            return
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_query)
        await flushed(self.nc)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def held(self, roots: Sequence[Cid]) -> list[Cid]:
        """The roots among ``roots`` pinned in any volume, in the asked order, once each."""
        found: list[Cid] = []
        seen: set[Cid] = set()
        for root in roots:
            if root in seen:
                continue
            seen.add(root)
            if any(index.get(root) is not None for index in self.pins):
                found.append(root)
        return found

    def held_blocks(self, cids: Sequence[Cid], pinned: Sequence[Cid]) -> list[Cid]:
        """The CIDs among ``cids`` not in ``pinned`` whose block this node has."""
        if self.blocks is None:
            return []
        skip = set(pinned)
        return [cid for cid in dict.fromkeys(cids) if cid not in skip and self.blocks.has(cid)]

    def _answer(self, roots: Sequence[Cid], blocks: bool) -> tuple[list[Cid], list[Cid]]:
        held = self.held(roots)
        return held, self.held_blocks(roots, held) if blocks else []

    async def _on_query(self, msg: Any) -> None:
        self.stats.requests += 1
        try:
            if not msg.reply:
                raise QueryError("no reply subject")
            roots, blocks = decode_block_query(msg.data)
        except QueryError as exc:
            self.stats.malformed += 1
            _log.warning("ignoring a malformed who-has request on %s: %s", self.subject, exc)
            return
        try:
            if len(roots) <= _INLINE_LOOKUPS:
                held, unpinned = self._answer(roots, blocks)
            else:
                held, unpinned = await asyncio.to_thread(self._answer, roots, blocks)
        except StoreError as exc:
            self.stats.errors += 1
            _log.error("cannot answer a who-has request: %s", exc)
            return
        if not held and not unpinned:
            self.stats.silent += 1
            return
        try:
            answer = encode_answer(self.node, self.labels, held, unpinned)
            await self.nc.publish(msg.reply, answer)
        except Exception as exc:  # a closed or reconnecting connection: the asker times out
            self.stats.errors += 1
            _log.warning("cannot answer a who-has request: %s", exc)
            return
        self.stats.answered += 1


# -- the asking side -----------------------------------------------------------------------------


async def who_has(
    nc: Any,
    roots: Sequence[Cid],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    expected: int | None = None,
    subjects: Subjects | None = None,
) -> dict[Cid, list[Holder]]:
    """The holders of each of ``roots`` (pinned copies only), asked of every agent at once.

    Publishes one query and gathers answers until ``timeout`` seconds have passed or
    ``expected`` agents have answered. A root nobody holds maps to an empty list. Holders of a
    root are sorted by node id; order them by proximity with ``fetch_model.order_holders``. Answers
    that cannot be decoded are logged and skipped.
    """
    subject = (subjects if subjects is not None else Subjects()).has
    wanted = list(dict.fromkeys(roots))
    found: dict[Cid, dict[str, Holder]] = {root: {} for root in wanted}
    if not wanted:
        return {}
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_answer(msg: Any) -> None:
        answers.put_nowait(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_answer)
    answered: set[str] = set()
    try:
        await nc.publish(subject, encode_query(wanted), reply=inbox)
        await nc.flush()
        deadline = time.monotonic() + timeout
        while expected is None or len(answered) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(answers.get(), left)
            except TimeoutError:
                break
            try:
                node, labels, held = decode_answer(data)
            except QueryError as exc:
                _log.warning("ignoring a malformed who-has reply: %s", exc)
                continue
            answered.add(node)
            holder = holder_of(node, labels)
            for root in held:
                if root in found:
                    found[root][node] = holder
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return {root: [holders[n] for n in sorted(holders)] for root, holders in found.items()}


async def find_holders(
    nc: Any,
    root: Cid,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    expected: int | None = None,
    subjects: Subjects | None = None,
) -> list[Holder]:
    """The nodes that hold ``root`` pinned, with their labels; [] when none answers in time.

    Waits ``timeout`` seconds, or less once ``expected`` holders have answered (pass the
    number of copies the locations projection records to return as soon as they are all
    heard from).
    """
    holders = await who_has(nc, [root], timeout=timeout, expected=expected, subjects=subjects)
    return holders[root]


async def find_block_holders(
    nc: Any,
    cid: Cid,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exclude: str = "",
    subjects: Subjects | None = None,
) -> list[Holder]:
    """The nodes that hold ``cid`` pinned as a root, then those that hold it as a block
    (nearest-first ordering is the fetcher's), never ``exclude``; [] when none answers.

    Returns at the first answer that makes the whole DAG under ``cid`` available: a node that
    holds it pinned, or any holder of a raw block (a leaf: its DAG is itself). Otherwise it
    gathers answers for ``timeout`` seconds.
    """
    subject = (subjects if subjects is not None else Subjects()).has
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_answer(msg: Any) -> None:
        answers.put_nowait(msg.data)

    pinned: dict[str, Holder] = {}
    unpinned: dict[str, Holder] = {}
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_answer)
    try:
        await nc.publish(subject, encode_query([cid], blocks=True), reply=inbox)
        await nc.flush()
        deadline = time.monotonic() + timeout
        while not pinned and not (unpinned and codec_of(cid) == RAW):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(answers.get(), left)
            except TimeoutError:
                break
            try:
                node, labels, roots, blocks = decode_block_answer(data)
            except (QueryError, dagcbor.DagCborError, InvalidCidError, ValueError) as exc:
                _log.warning("ignoring a malformed who-has reply: %s", exc)
                continue
            if node == exclude:
                continue
            if cid in roots:
                pinned[node] = holder_of(node, labels)
            elif cid in blocks:
                unpinned[node] = holder_of(node, labels)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return [pinned[n] for n in sorted(pinned)] + [unpinned[n] for n in sorted(unpinned)]
