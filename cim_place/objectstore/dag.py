"""Walking a DAG: every block below a root, once, in CAR export order.

The order is depth first, root first, children in link order, each block at its first
occurrence: the order kubo's ``dag export`` writes a CAR in. Raw (0x55) and dag-pb (0x70)
blocks are understood; a block of another codec stops the walk with a StoreError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from cim_place.errors import StoreError
from cim_place.interfaces import BlockSource
from cim_place.objectstore.cid import DAG_PB, RAW, Cid, codec_of, to_str
from cim_place.objectstore.dagpb import links_of


def _children(cid: Cid, block: bytes) -> list[Cid]:
    try:
        return links_of(codec_of(cid), block)
    except ValueError as exc:
        raise StoreError(f"cannot follow the links of block {to_str(cid)}: {exc}") from None


def _links(source: BlockSource, cid: Cid) -> list[Cid]:
    """The children of ``cid``; a raw block has none, so it is not read."""
    if codec_of(cid) == RAW:
        return []
    return _children(cid, source.get(cid))


def _depth_first(root: Cid, expand: Callable[[Cid], list[Cid]]) -> Iterator[Cid]:
    """Every CID below ``root`` once, in walk order. ``expand`` gives a CID's children; it is
    called only once the caller has taken that CID (so the caller may read the block first)."""
    seen: set[Cid] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        yield cid
        stack.extend(reversed(expand(cid)))


def walk(source: BlockSource, root: Cid) -> Iterator[tuple[Cid, bytes]]:
    """(cid, block) of every block of the DAG under ``root``, once each, root first.

    Raises BlockNotFoundError (from ``source``) at the first absent block; see ``missing``.
    """
    # A block read for the caller waits here until the walk expands its CID, right after.
    read: dict[Cid, bytes] = {}
    for cid in _depth_first(root, lambda cid: _children(cid, read.pop(cid))):
        read[cid] = source.get(cid)
        yield cid, read[cid]


def walk_cids(source: BlockSource, root: Cid) -> Iterator[Cid]:
    """The CIDs of ``walk``, in the same order. Raw blocks have no links, so they are named
    without being read (nor checked for presence); only dag-pb blocks are fetched."""
    return _depth_first(root, lambda cid: _links(source, cid))


def survey(source: BlockSource, root: Cid) -> tuple[list[Cid], int]:
    """(``missing(source, root)``, distinct blocks of the DAG) in one walk; the count is that
    of ``walk_cids`` when nothing is missing (below an absent block nothing is counted)."""
    absent: list[Cid] = []

    def present_links(cid: Cid) -> list[Cid]:
        if source.has(cid):
            return _links(source, cid)
        absent.append(cid)
        return []

    count = sum(1 for _ in _depth_first(root, present_links))
    return absent, count


def missing(source: BlockSource, root: Cid) -> list[Cid]:
    """The blocks of the DAG under ``root`` that ``source`` lacks, in walk order.

    Below an absent block nothing is known, so only the absent block itself is listed; fetch
    it and ask again to learn what lies beneath.
    """
    return survey(source, root)[0]


def members(source: BlockSource, root: Cid) -> tuple[frozenset[Cid], bool]:
    """(every CID under ``root`` that the blocks in ``source`` name, complete?), for serving
    checks. Only dag-pb nodes are read (raw leaves are named by their parents; other codecs'
    links are not followed); an absent or undecodable node ends its branch quietly and makes the
    answer incomplete, since a node may hold a DAG only in part."""
    complete = True

    def expand(cid: Cid) -> list[Cid]:
        nonlocal complete
        if codec_of(cid) != DAG_PB:
            return []
        try:
            return _children(cid, source.get(cid))
        except StoreError:  # absent, corrupt or undecodable here
            complete = False
            return []

    return frozenset(_depth_first(root, expand)), complete
