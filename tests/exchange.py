"""What the block-exchange tests share: content to import, a lying holder, a pair of leaves.

The fixtures ``pair``, ``clients`` and ``volume`` built on them live in tests/conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from memstore import MemoryBlockStore

from cim_place.interfaces import BlockSink
from cim_place.local.servers import NatsServer
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import import_file

MiB = 1 << 20


def import_into(store: BlockSink, size: int, profile: str, seed: str = "fetch") -> Cid:
    return import_file(chacha_stream(seed, size), store, profile).root


def content(seed: str, size: int) -> bytes:
    return chacha_stream(seed, size).read()


class LyingStore(MemoryBlockStore):
    """A holder's store that serves wrong bytes for some blocks (a bad disk or a bad actor)."""

    def __init__(self, lies: set[Cid]) -> None:
        super().__init__()
        self.lies = lies

    def get(self, cid: Cid) -> bytes:
        data = super().get(cid)
        return b"x" + data[1:] if cid in self.lies else data


@dataclass
class Pair:
    a: NatsServer
    b: NatsServer
