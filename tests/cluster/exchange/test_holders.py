"""Who-has queries against real nats-servers: hub1 with two leaves, an agent's responder on
each, a fetcher asking from the other leaf."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cim_place.cluster.exchange.fetch_model import Holder
from cim_place.cluster.exchange.holders import (
    MAX_QUERY_CIDS,
    HolderResponder,
    QueryError,
    decode_answer,
    decode_query,
    encode_answer,
    encode_query,
    find_block_holders,
    find_holders,
    who_has,
)
from cim_place.cluster.nats.subjects import Subjects
from cim_place.objectstore import dagcbor, dagpb
from cim_place.objectstore.cid import RAW, Cid, make_cid, to_str
from cim_place.objectstore.store import ObjectStore
from cim_place.testing import LeafFactory, connected

LABELS_A = {"region": "eu", "zone": "eu-1", "host": "host-a", "disk": "ssd"}
LABELS_B = {"region": "eu", "zone": "eu-2", "host": "host-b"}


def unknown_cid(n: int = 0) -> Cid:
    return make_cid(RAW, f"nobody has this {n}".encode())


async def find_eventually(nc: Any, root: Cid, count: int) -> list[Holder]:
    """Ask until ``count`` holders answer: a subscription reaches other leaves asynchronously."""
    for _ in range(100):
        found = await find_holders(nc, root, timeout=0.2, expected=count)
        if len(found) >= count:
            return found
    raise AssertionError(f"fewer than {count} holders of the root answered")


@pytest.fixture
def stores(tmp_path: Path) -> Any:
    with ObjectStore(tmp_path / "a") as a, ObjectStore(tmp_path / "b") as b:
        yield a, b


@pytest.fixture
async def two_leaves(leaf_factory: LeafFactory) -> AsyncIterator[tuple[Any, Any]]:
    leaf_a = leaf_factory("leaf-a")
    leaf_b = leaf_factory("leaf-b")
    async with connected(leaf_a.url, name="a") as nc_a, connected(leaf_b.url, name="b") as nc_b:
        yield nc_a, nc_b


# -- wire format -------------------------------------------------------------------------------


def test_query_and_answer_round_trip() -> None:
    roots = [unknown_cid(i) for i in range(3)]
    assert decode_query(encode_query(roots)) == roots
    assert decode_answer(encode_answer("leaf-a", LABELS_A, roots[:1])) == (
        "leaf-a",
        LABELS_A,
        roots[:1],
    )


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xff\xff",
        dagcbor.encode([1, 2]),
        dagcbor.encode({"v": 2, "cids": []}),
        dagcbor.encode({"v": 1}),
        dagcbor.encode({"v": 1, "cids": ["not a link"]}),
        dagcbor.encode({"v": 1, "cids": [dagcbor.Link(b"\x01\x55\x12\x20short")]}),
        dagcbor.encode({"v": 1, "cids": [dagcbor.Link(unknown_cid())] * (MAX_QUERY_CIDS + 1)}),
    ],
)
def test_malformed_queries(garbage: bytes) -> None:
    with pytest.raises(QueryError):
        decode_query(garbage)


# -- against servers ---------------------------------------------------------------------------


async def test_holder_on_another_leaf_is_found_with_its_labels(
    two_leaves: tuple[Any, Any], stores: tuple[ObjectStore, ObjectStore]
) -> None:
    nc_a, nc_b = two_leaves
    store_a, _ = stores
    pin = store_a.add(io.BytesIO(b"held on leaf a" * 1000))
    responder = HolderResponder(nc_a, "leaf-a", store_a.pins, labels=LABELS_A)
    await responder.start()
    try:
        found = await find_eventually(nc_b, pin.root, 1)
        assert found == [Holder("leaf-a", region="eu", zone="eu-1", host="host-a")]
        # An unknown root: nobody answers, the asker returns empty-handed after its timeout.
        silent = responder.stats.silent
        assert await find_holders(nc_b, unknown_cid(), timeout=0.3) == []
        assert responder.stats.silent == silent + 1
        # Unpinned content is not held any more, even if its blocks are still there.
        store_a.unpin(to_str(pin.root))
        assert await find_holders(nc_b, pin.root, timeout=0.3) == []
    finally:
        await responder.stop()


async def test_two_holders_and_several_roots(
    two_leaves: tuple[Any, Any], stores: tuple[ObjectStore, ObjectStore]
) -> None:
    nc_a, nc_b = two_leaves
    store_a, store_b = stores
    both = store_a.add(io.BytesIO(b"everywhere"))
    store_b.add(io.BytesIO(b"everywhere"))
    only_b = store_b.add(io.BytesIO(b"only on b"))
    responders = [
        HolderResponder(nc_a, "leaf-a", [store_a.pins], labels=LABELS_A),
        HolderResponder(nc_b, "leaf-b", store_b.pins, labels=LABELS_B),
    ]
    for responder in responders:
        await responder.start()
    try:
        async with connected(nc_a.connected_url.geturl(), name="fetcher") as nc:
            found = await find_eventually(nc, both.root, 2)
            assert [h.node for h in found] == ["leaf-a", "leaf-b"]
            assert found[1].zone == "eu-2"
            table = await who_has(
                nc, [both.root, only_b.root, unknown_cid()], timeout=1, expected=2
            )
        assert [h.node for h in table[both.root]] == ["leaf-a", "leaf-b"]
        assert [h.node for h in table[only_b.root]] == ["leaf-b"]
        assert table[unknown_cid()] == []
    finally:
        for responder in responders:
            await responder.stop()


async def test_garbage_does_not_kill_the_responder(
    two_leaves: tuple[Any, Any], stores: tuple[ObjectStore, ObjectStore]
) -> None:
    nc_a, nc_b = two_leaves
    store_a, _ = stores
    pin = store_a.add(io.BytesIO(b"still served"))
    responder = HolderResponder(nc_a, "leaf-a", store_a.pins, labels=LABELS_A)
    await responder.start()
    try:
        await find_eventually(nc_b, pin.root, 1)
        subject = Subjects().has
        inbox = nc_b.new_inbox()
        heard: list[bytes] = []

        async def on_reply(msg: Any) -> None:
            heard.append(msg.data)

        await nc_b.subscribe(inbox, cb=on_reply)
        before = responder.stats.malformed
        for garbage in (b"", b"\x00garbage", dagcbor.encode({"v": 1, "cids": 7})):
            await nc_b.publish(subject, garbage, reply=inbox)
        await nc_b.publish(subject, encode_query([pin.root]))  # no reply subject
        # A query of many roots is looked up off the event loop, and still answered.
        many = [unknown_cid(i) for i in range(100)] + [pin.root]
        table = await who_has(nc_b, many, timeout=2, expected=1)
        assert [h.node for h in table[pin.root]] == ["leaf-a"]
        await nc_b.flush()
        for _ in range(100):
            if responder.stats.malformed >= before + 4:
                break
            await asyncio.sleep(0.02)
        assert responder.stats.malformed == before + 4
        assert heard == []  # malformed requests get no answer
        assert await find_holders(nc_b, pin.root, timeout=2, expected=1) != []
    finally:
        await responder.stop()


async def test_block_query_finds_unpinned_blocks_only_where_offered(
    two_leaves: tuple[Any, Any], stores: tuple[ObjectStore, ObjectStore]
) -> None:
    """A block query names a child block: a responder given its blocks answers for it, pinned
    roots still come first, and a responder without blocks stays silent as before."""
    nc_a, nc_b = two_leaves
    store_a, store_b = stores
    data = bytes(range(256)) * 12_000  # three 1 MiB leaves
    pin_a = store_a.add(io.BytesIO(data))
    store_b.add(io.BytesIO(data))
    leaf = dagpb.decode_node(store_a.blocks.get(pin_a.root)).links[1].hash
    responders = [
        HolderResponder(nc_a, "leaf-a", store_a.pins, labels=LABELS_A, blocks=store_a.blocks),
        HolderResponder(nc_b, "leaf-b", store_b.pins, labels=LABELS_B),
    ]
    for responder in responders:
        await responder.start()
    try:
        async with connected(nc_a.connected_url.geturl(), name="fetcher") as nc:
            assert [h.node for h in await find_block_holders(nc, leaf, timeout=2)] == ["leaf-a"]
            assert await find_block_holders(nc, leaf, timeout=0.3, exclude="leaf-a") == []
            assert await find_holders(nc, leaf, timeout=0.3) == []  # a plain query: roots only
            roots = await find_block_holders(nc, pin_a.root, timeout=2)
            assert roots and roots[0].node in {"leaf-a", "leaf-b"}
            assert await find_block_holders(nc, unknown_cid(), timeout=0.3) == []
    finally:
        for responder in responders:
            await responder.stop()
