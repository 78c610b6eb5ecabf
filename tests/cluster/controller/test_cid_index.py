"""The compact CID index behaves like a dict of CID -> slot, with free slots reused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cim_place.cluster.controller.cid_index import (
    MAX_PREFIXES,
    CidIndex,
    CidIndexError,
)
from cim_place.objectstore.cid import DAG_PB, RAW, make_cid

# Few digests and prefixes, so sequences revisit keys; lengths from 0 to 44 bytes, so every path
# (interned prefix, empty prefix, too short, too long) is taken.
_digests = st.sampled_from([bytes([i]) * 32 for i in range(6)] + [bytes(31) + b"\x01"])
_prefixes = st.sampled_from([b"\x01\x55\x12\x20", b"\x12\x20", b"", b"\x01\x70\x12\x20"])
_cids = st.one_of(
    st.builds(lambda p, d: p + d, _prefixes, _digests),
    st.binary(min_size=0, max_size=44),
)
_ops = st.lists(st.tuples(st.sampled_from(["add", "pop", "get"]), _cids), max_size=200)


def check_same(index: CidIndex, model: dict[bytes, int]) -> None:
    assert len(index) == len(model)
    assert sorted(index.keys()) == sorted(model)
    for key, slot in model.items():
        assert index.get(key) == slot
        assert key in index
        assert index.key_at(slot) == key
    live = set(model.values())
    for slot in range(index.slots):
        if slot not in live:
            assert index.key_at(slot) is None


@settings(max_examples=300, deadline=None)
@given(_ops, st.integers(min_value=1, max_value=8))
def test_behaves_like_a_dict(ops: list[tuple[str, bytes]], capacity: int) -> None:
    index = CidIndex(capacity)
    model: dict[bytes, int] = {}
    freed: list[int] = []
    for op, key in ops:
        if op == "add":
            slot = index.add(key)
            if key in model:
                assert slot == model[key]
            else:
                # A new key takes the slot freed last, else the next new one.
                expected = freed.pop() if freed else index.slots - 1
                assert slot == expected
                model[key] = slot
        elif op == "pop":
            slot = index.pop(key)
            assert slot == model.pop(key, None)
            if slot is not None:
                freed.append(slot)
        else:
            assert index.get(key) == model.get(key)
    check_same(index, model)
    check_same(CidIndex.from_arrays(index.to_arrays()), model)


@settings(max_examples=50, deadline=None)
@given(_ops)
def test_round_trip_keeps_free_list_order(ops: list[tuple[str, bytes]]) -> None:
    index = CidIndex()
    for op, key in ops:
        if op == "add":
            index.add(key)
        elif op == "pop":
            index.pop(key)
    loaded = CidIndex.from_arrays(index.to_arrays())
    fresh = [make_cid(RAW, bytes([i])) for i in range(5)]
    assert [loaded.add(c) for c in fresh] == [index.add(c) for c in fresh]


def test_grows_and_reuses_tombstones_at_scale() -> None:
    index = CidIndex()
    cids = [make_cid(RAW if i % 2 else DAG_PB, i.to_bytes(4, "big")) for i in range(20_000)]
    slots = [index.add(c) for c in cids]
    assert slots == list(range(len(cids)))
    for c in cids[::2]:
        index.pop(c)
    for c in cids[::2]:
        index.add(c)  # takes freed slots: no new ones
    assert index.slots == len(cids)
    assert len(index) == len(cids)
    assert sorted(index.keys()) == sorted(cids)
    assert {index.get(c) for c in cids} == set(range(len(cids)))
    assert index.capacity * 3 >= len(cids) * 4


def test_prefixes_beyond_the_interned_ones_spill() -> None:
    index = CidIndex()
    keys = [i.to_bytes(2, "big") + bytes([i % 256]) * 32 for i in range(MAX_PREFIXES + 10)]
    slots = [index.add(k) for k in keys]
    assert [index.get(k) for k in keys] == slots
    assert index.keys() == keys
    loaded = CidIndex.from_arrays(index.to_arrays())
    assert [loaded.get(k) for k in keys] == slots


def test_keys_at_skips_free_slots() -> None:
    index = CidIndex()
    a, b, c = (make_cid(RAW, x) for x in (b"a", b"b", b"c"))
    for key in (a, b, c):
        index.add(key)
    index.pop(b)
    assert index.keys_at(np.array([2, 1, 0])) == [c, a]
    with pytest.raises(IndexError):
        index.keys_at([3])


def test_inconsistent_arrays_are_refused() -> None:
    index = CidIndex()
    a, b = make_cid(RAW, b"a"), make_cid(RAW, b"b")
    index.add(a)
    index.add(b)
    arrays = index.to_arrays()

    twice = dict(arrays, records=arrays["records"].copy())
    twice["records"][1] = twice["records"][0]
    with pytest.raises(CidIndexError, match="twice"):
        CidIndex.from_arrays(twice)

    with pytest.raises(CidIndexError, match="free list"):
        CidIndex.from_arrays(dict(arrays, free=np.array([0], dtype=np.int32)))

    unknown = dict(arrays, records=arrays["records"].copy())
    unknown["records"][0, 0] = 7
    with pytest.raises(CidIndexError, match="unknown prefix"):
        CidIndex.from_arrays(unknown)

    with pytest.raises(CidIndexError, match="lack"):
        CidIndex.from_arrays({k: v for k, v in arrays.items() if k != "free"})

    with pytest.raises(CidIndexError, match="records"):
        CidIndex.from_arrays(dict(arrays, records=np.zeros((2, 36), dtype=np.uint8)))
