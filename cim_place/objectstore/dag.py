"""Walking a DAG: every block below a root, once, in CAR export order.

The order is depth first, root first, children in link order, each block at its first
occurrence: the order kubo's ``dag export`` writes a CAR in. Raw (0x55) and dag-pb (0x70)
blocks are understood; a block of another codec stops the walk with a StoreError.
"""

from __future__ import annotations

from collections.abc import Iterator

from cim_place.errors import StoreError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import RAW, Cid, codec_of, to_str
from cim_place.objectstore.dagpb import links_of


def _children(cid: Cid, block: bytes) -> list[Cid]:
    try:
        return links_of(codec_of(cid), block)
    except ValueError as exc:
        raise StoreError(f"cannot follow the links of block {to_str(cid)}: {exc}") from None


def walk(source: BlockSource, root: Cid) -> Iterator[tuple[Cid, bytes]]:
    """(cid, block) of every block of the DAG under ``root``, once each, root first.

    Raises BlockNotFoundError (from ``source``) at the first absent block; see ``missing``.
    """
    seen: set[Cid] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        block = source.get(cid)
        yield cid, block
        stack.extend(reversed(_children(cid, block)))


def walk_cids(source: BlockSource, root: Cid) -> Iterator[Cid]:
    """The CIDs of ``walk``, in the same order. Raw blocks have no links, so they are named
    without being read (nor checked for presence); only dag-pb blocks are fetched."""
    seen: set[Cid] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        yield cid
        if codec_of(cid) != RAW:
            stack.extend(reversed(_children(cid, source.get(cid))))


def missing(source: BlockSource, root: Cid) -> list[Cid]:
    """The blocks of the DAG under ``root`` that ``source`` lacks, in walk order.

    Below an absent block nothing is known, so only the absent block itself is listed; fetch
    it and ask again to learn what lies beneath.
    """
    absent: list[Cid] = []
    seen: set[Cid] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        if not source.has(cid):
            absent.append(cid)
        elif codec_of(cid) != RAW:
            stack.extend(reversed(_children(cid, source.get(cid))))
    return absent
