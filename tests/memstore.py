"""A dict-backed BlockStore for tests: verifies every block on get, like a real store must."""

from __future__ import annotations

from collections.abc import Iterator

from cim_place.errors import BlockNotFoundError
from cim_place.objectstore.cid import Cid, to_str, verify


class MemoryBlockStore:
    """BlockStore in memory. ``blocks`` is public so tests can corrupt or remove entries."""

    def __init__(self) -> None:
        self.blocks: dict[Cid, bytes] = {}
        self.gets = 0

    def has(self, cid: Cid) -> bool:
        return cid in self.blocks

    def get(self, cid: Cid) -> bytes:
        try:
            data = self.blocks[cid]
        except KeyError:
            raise BlockNotFoundError(to_str(cid)) from None
        self.gets += 1
        verify(cid, data)
        return data

    def put(self, cid: Cid, data: bytes) -> bool:
        if cid in self.blocks:
            return False
        self.blocks[cid] = bytes(data)
        return True

    def delete(self, cid: Cid) -> bool:
        return self.blocks.pop(cid, None) is not None

    def cids(self) -> Iterator[Cid]:
        return iter(list(self.blocks))

    def used_bytes(self) -> int:
        return sum(len(block) for block in self.blocks.values())
