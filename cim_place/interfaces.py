"""The components of cim-place and what each promises. Read this file first.

Every component is a Protocol; concrete implementations live in the subpackages and are wired
together in one place per process (the CLI commands, and later the agent and controller
entry points). Pure-logic tests may use in-memory implementations of these Protocols; anything
that talks to NATS is tested against real nats-server processes (see :mod:`cim_place.testing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cim_place.objectstore.cid import Cid


class BlockSource(Protocol):
    """Where blocks are read from."""

    def has(self, cid: Cid) -> bool:
        """True when the block is present. Cheap: never reads the block's bytes."""
        ...

    def get(self, cid: Cid) -> bytes:
        """The block's bytes, verified against ``cid``.

        Raises BlockNotFoundError when absent and CorruptBlockError when the stored bytes do not
        hash to ``cid``; a corrupt block is never returned.
        """
        ...


class BlockSink(Protocol):
    """Where blocks are written to."""

    def put(self, cid: Cid, data: bytes) -> bool:
        """Store a block. Idempotent: returns False when it was already present.

        The caller vouches that ``data`` hashes to ``cid`` (the importer computed it); blocks
        from outside are verified before they get here. Safe under concurrent writers of the same
        block. Raises StoreFullError when there is no room, leaving nothing addressable.
        """
        ...


class BlockStore(BlockSource, BlockSink, Protocol):
    """One volume's blocks: a directory on one disk."""

    def delete(self, cid: Cid) -> bool:
        """Remove a block; returns False when it was absent. Idempotent."""
        ...

    def cids(self) -> Iterator[Cid]:
        """Every block present, in no particular order."""
        ...

    def used_bytes(self) -> int:
        """Bytes of block data held (the sum of block sizes)."""
        ...


@dataclass(frozen=True, slots=True)
class Pin:
    """A pinned root: the DAG below it is kept until unpinned."""

    root: Cid
    size: int
    """File bytes of the content (for UnixFS files, the file size)."""
    blocks: int
    """Number of distinct blocks in the DAG."""
    name: str | None = None
    owner: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    pinned_at: float = 0.0
    """Unix time of the pin."""


class PinIndex(Protocol):
    """The local index of pinned roots of one store."""

    def add(self, pin: Pin) -> None:
        """Record a pin; pinning the same root again replaces its record. Call only once the
        whole DAG is present, so that a pin always means "complete here"."""
        ...

    def remove(self, root: Cid) -> bool:
        """Forget a pin; returns False when it was absent. Blocks stay until garbage collection."""
        ...

    def get(self, root: Cid) -> Pin | None: ...

    def by_name(self, name: str) -> Pin | None: ...

    def list(self) -> list[Pin]: ...
