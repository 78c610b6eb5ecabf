"""Where the gateway's blocks and access decisions come from: the contracts and the local parts.

:class:`ContentSource` gives a verified, blocking ``BlockSource`` for a root's DAG, or says
that no node holds it. :class:`LocalContent` answers from this node's volumes alone (a node
with no NATS, or tests); the domain-wide source, which fetches what this node lacks from the
other nodes, lives beside the agent wiring (``cim_place.http.domain``).

Identity and access: a request's identity is a user name or None (anonymous), found by
:class:`Identify` from a bearer token (``Authorization: Bearer ...``) or a verified client
certificate (mTLS, its subject's common name). :class:`Access` decides, per root, with the
rule of ``docs/SECURITY.md`` (owner and readers); :class:`OpenAccess` is an open domain's.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

from aiohttp import web

from cim_place.errors import CimPlaceError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import DAG_PB, Cid, codec_of, to_str
from cim_place.objectstore.dagpb import decode_node


class NotHeldError(CimPlaceError):
    """No node of the domain holds the content (answered with 404)."""

    def __init__(self, root: Cid) -> None:
        self.root = root
        super().__init__(f"{to_str(root)} is not held by any node of this domain")


class UnknownTokenError(CimPlaceError):
    """A bearer token that names no user (answered with 401)."""


class ContentSource(Protocol):
    """Blocks of DAGs, for the gateway."""

    async def open(self, root: Cid) -> BlockSource:
        """A source for blocks of the DAG under ``root``: ``get`` blocks (call it from a worker
        thread), returns only verified bytes, and raises BlockNotFoundError or
        CorruptBlockError when a block cannot be had. Raises NotHeldError when no node holds
        ``root`` (for a block that is not a root: when no known DAG contains it)."""
        ...

    def dag_root(self, cid: Cid) -> Cid:
        """The root whose DAG ``cid`` was last read under (``cid`` itself when unknown): the
        object whose access rules apply to a request that names a child block alone."""
        ...

    def saw(self, root: Cid, cid: Cid, block: bytes) -> None:
        """The gateway read ``block`` under ``root``: a hint for later requests that name a
        child block alone (a verifying client walks a DAG one ``?format=raw`` at a time)."""
        ...


class Access(Protocol):
    """May this requester read the DAG under ``root``?"""

    async def may_read(self, requester: str | None, root: Cid) -> bool: ...


class OpenAccess:
    """An open domain: every object is readable by everyone."""

    async def may_read(self, requester: str | None, root: Cid) -> bool:
        return True


class LocalContent:
    """The DAGs this node's volumes hold; nothing is fetched."""

    def __init__(self, blocks: BlockSource) -> None:
        self.blocks = blocks
        self.hints = RootHints()

    async def open(self, root: Cid) -> BlockSource:
        if not self.blocks.has(root):
            raise NotHeldError(root)
        return self.blocks

    def dag_root(self, cid: Cid) -> Cid:
        return self.hints.root_of(cid)

    def saw(self, root: Cid, cid: Cid, block: bytes) -> None:
        self.hints.note(self.hints.root_of(root), cid, block)


class RootHints:
    """child CID -> the root whose DAG the gateway read it under, the most recent ``capacity``."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self._roots: OrderedDict[Cid, Cid] = OrderedDict()

    def note(self, root: Cid, cid: Cid, block: bytes) -> None:
        if codec_of(cid) != DAG_PB:
            return
        try:
            links = decode_node(block).links
        except ValueError:
            return
        for link in links:
            self._roots[link.hash] = root
            self._roots.move_to_end(link.hash)
        while len(self._roots) > self.capacity:
            self._roots.popitem(last=False)

    def root_of(self, cid: Cid) -> Cid:
        return self._roots.get(cid, cid)


def token_digest(token: str) -> str:
    """How a token is stored in configuration: its SHA-256, hex (the token itself is not)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Identify:
    """The requester of an HTTP request: a bearer token's user, else the common name of a
    verified client certificate, else None (anonymous).

    ``tokens`` maps a token's :func:`token_digest` to its user; ``peer_user`` may turn a client
    certificate into a user (default: its subject's common name).
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        peer_user: Callable[[dict[str, object]], str | None] | None = None,
    ) -> None:
        self.tokens = dict(tokens or {})
        self.peer_user = peer_user or common_name

    def __call__(self, request: web.BaseRequest) -> str | None:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnknownTokenError("Authorization must be 'Bearer <token>'")
            digest = token_digest(token.strip())
            for known, user in self.tokens.items():
                if hmac.compare_digest(known, digest):
                    return user
            raise UnknownTokenError("the bearer token is not known to this node")
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        if isinstance(peer, dict) and peer:
            return self.peer_user(peer)
        return None


def common_name(peer: dict[str, object]) -> str | None:
    """The subject CN of a certificate as ``ssl`` reports it (verified before it gets here)."""
    subject = peer.get("subject")
    if not isinstance(subject, tuple):
        return None
    for rdn in subject:
        for pair in rdn if isinstance(rdn, tuple) else ():
            if isinstance(pair, tuple) and len(pair) == 2 and pair[0] == "commonName":
                return str(pair[1])
    return None
