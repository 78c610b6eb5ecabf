"""The status index without NATS: pages equal a filter over every row, cursors visit each row
once, name globs agree with fnmatch, and hostile requests are refused naming the problem."""

from __future__ import annotations

import fnmatch
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cim_place.cluster.controller import status_columns, status_index, status_names
from cim_place.cluster.controller.status_columns import Columns
from cim_place.cluster.controller.status_index import StatusIndex
from cim_place.cluster.controller.status_rows import (
    MAX_LIMIT,
    STATUS_API,
    BadStatusQuery,
    Query,
    Row,
    glob_regex,
    name_matches,
    parse_request,
    row_of,
)
from cim_place.objectstore.cid import RAW, make_cid, to_str
from cim_place.placement.status import OBJECT_STATES, Location, ObjectState, ObjectStatus

NODES = ["n1", "n2", "n3", "n4", "n5", "n6"]
POLICIES = ["default", "docs", "ledger"]
NAMES = [None, "docs/a", "docs/b.pdf", "ledger/2026/01", "Docs/A", "été/ß", "x", ""]


def cid(i: int) -> str:
    return to_str(make_cid(RAW, i.to_bytes(4, "big")))


def status(i: int, rng: random.Random) -> ObjectStatus:
    nodes = rng.sample(NODES, rng.randint(0, 6))
    return ObjectStatus(
        cid=cid(i),
        state=rng.choice(OBJECT_STATES),
        locations=tuple(
            Location(node, "v0", state=rng.choice(("pinned", "fetching"))) for node in nodes
        ),
        desired=rng.randint(0, 5),
        policy=rng.choice(POLICIES),
        name=rng.choice(NAMES),
        size=rng.randint(0, 1 << 40),
    )


def brute(model: dict[str, Row], query: Query) -> list[Row]:
    return [row for _, row in sorted(model.items()) if query.matches(row)][: query.limit]


def walk(index: StatusIndex, query: Query) -> list[Row]:
    seen: list[Row] = []
    after = None
    while True:
        page = index.page(
            Query(query.state, query.node, query.policy, query.name, after, query.limit)
        )
        seen.extend(page.rows)
        if page.next is None:
            return seen
        assert page.next == page.rows[-1].cid
        after = page.next


AT_ONCE = 1 << 40
STEPS = [AT_ONCE, 1, 3]
"""Rows of the large run per call while a large merge goes on: all of them at once, or a few
so that a merge spans many writes and reads (rows written before and after their slice)."""


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("seed", range(6))
def test_pages_equal_a_filter_over_every_row(
    seed: int, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_index, "MERGE_AT", 7)  # many merges, rows in every run
    monkeypatch.setattr(status_names, "_COMPACT_AFTER", 5)  # name rebuilds during merges
    rng = random.Random(seed)
    index = StatusIndex(step)
    model: dict[str, Row] = {}
    for _ in range(400):
        i = rng.randrange(120)
        if rng.random() < 0.2:
            index.remove(cid(i))
            model.pop(cid(i), None)
        else:
            s = status(i, rng)
            index.update(s)
            model[s.cid] = row_of(s)
        assert len(index) == len(model)
    check_pages(index, model, rng)
    index.flush()
    check_pages(index, model, rng)


def check_pages(index: StatusIndex, model: dict[str, Row], rng: random.Random) -> None:
    assert all(index.get(key) == row for key, row in model.items())
    assert index.get(cid(10_000)) is None
    queries = [Query(limit=rng.randint(1, 9))]
    for _ in range(25):
        queries.append(
            Query(
                state=rng.choice([None, *OBJECT_STATES]),
                node=rng.choice([None, *NODES]),
                policy=rng.choice([None, *POLICIES]),
                name=rng.choice([None, "docs/*", "*", "?", "*/*", "[!d]*", "été*", "[a-z]"]),
                limit=rng.randint(1, 9),
            )
        )
    for query in queries:
        every = [row for _, row in sorted(model.items()) if query.matches(row)]
        assert walk(index, query) == every  # each row once, in CID order
        after = rng.choice([None, *model])
        cut = Query(query.state, query.node, query.policy, query.name, after, query.limit)
        assert index.page(cut).rows == brute(model, cut)


def test_many_nodes_spill_and_still_filter() -> None:
    index = StatusIndex()
    many = ObjectStatus(cid(1), "placed", tuple(Location(n, "v0") for n in NODES), 6, "default")
    index.update(many)
    index.flush()
    assert [r.cid for r in index.page(Query(node="n6")).rows] == [cid(1)]
    assert index.get(cid(1)) == row_of(many)
    index.update(ObjectStatus(cid(1), "placed", (Location("n1", "v0"),), 1, "default"))
    assert index.page(Query(node="n6")).rows == []


def test_unknown_node_or_policy_is_an_empty_page() -> None:
    index = StatusIndex()
    index.update(ObjectStatus(cid(1), "placed", (Location("n1", "v0"),), 1, "default"))
    assert index.page(Query(node="n9")).rows == [] and index.page(Query(policy="x")).rows == []


def test_renamed_and_removed_names_are_compacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_index, "MERGE_AT", 50)
    index = StatusIndex()
    for generation in range(3):
        for i in range(40_000):
            index.update(
                ObjectStatus(cid(i), "placed", (), 1, "default", name=f"g{generation}/{i}")
            )
    assert len(index) == 40_000
    assert index.get(cid(5)) is not None and index.get(cid(5)).name == "g2/5"  # type: ignore[union-attr]
    found = walk(index, Query(name="g2/1*", limit=MAX_LIMIT))
    assert len(found) == len([i for i in range(40_000) if str(i).startswith("1")])
    assert walk(index, Query(name="g1/*", limit=MAX_LIMIT)) == []


names = st.text(alphabet="ab/.é*?[]!-\\", max_size=6)
globs = st.text(alphabet="ab/.é*?[]!-\\", max_size=6)


@settings(max_examples=400, deadline=None)
@given(glob=globs, name=names)
def test_glob_translation_agrees_with_fnmatch(glob: str, name: str) -> None:
    assert name_matches(glob, name) == fnmatch.fnmatchcase(name, glob)


@settings(max_examples=150, deadline=None)
@given(glob=globs, chosen=st.lists(names, max_size=8))
def test_glob_over_the_blob_agrees_with_fnmatch(glob: str, chosen: list[str]) -> None:
    index = StatusIndex()
    for i, name in enumerate(chosen):
        index.update(ObjectStatus(cid(i), "placed", (), 1, "default", name=name))
    listed = {row.cid for row in walk(index, Query(name=glob, limit=3))}
    assert listed == {cid(i) for i, name in enumerate(chosen) if fnmatch.fnmatchcase(name, glob)}
    assert "\n" not in glob_regex(glob).replace("[^\n]", "").replace("(?!\n)", "")


def request(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_good_request_parses() -> None:
    query = parse_request(
        request(state="lost", node="n1", policy="docs", name="docs/*", after=cid(3), limit=10)
    )
    assert query == Query("lost", "n1", "docs", "docs/*", cid(3), 10)
    assert parse_request(request()) == Query()
    assert parse_request(request(cid=cid(1))) == cid(1)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"\xff", "JSON"),
        (b"[]", "object"),
        (request(state="sideways"), "sideways"),
        (request(state=1), "state"),
        (request(limit=0), "limit"),
        (request(limit=MAX_LIMIT + 1), "limit"),
        (request(limit=True), "limit"),
        (request(limit="5"), "limit"),
        (request(node="no such"), "node"),
        (request(name="a" * 2000), "name"),
        (request(name="a\x01"), "name"),
        (request(after="x" * 500), "after"),
        (request(colour="red"), "colour"),
        (request(cid=cid(1), state="lost"), "cid"),
        (b"{" + b" " * 10_000 + b"}", "bytes"),
    ],
)
def test_hostile_requests_are_refused_naming_the_problem(body: bytes, named: str) -> None:
    with pytest.raises(BadStatusQuery) as info:
        parse_request(body)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_the_operator_may_ask_and_the_controller_may_answer() -> None:
    from cim_place.cluster.nats.permissions import controller_permissions, operator_permissions
    from cim_place.cluster.nats.subjects import Subjects

    subjects = Subjects()
    subject = subjects.api(STATUS_API)

    def allowed(patterns: tuple[str, ...]) -> bool:
        tokens = subject.split(".")
        for pattern in patterns:
            parts = pattern.split(".")
            if (
                parts[-1] == ">"
                and len(tokens) >= len(parts)
                and all(p in ("*", t) for p, t in zip(parts[:-1], tokens, strict=False))
            ):
                return True
            if len(parts) == len(tokens) and all(
                p in ("*", t) for p, t in zip(parts, tokens, strict=True)
            ):
                return True
        return False

    assert allowed(operator_permissions(subjects, "hub").publish)
    assert allowed(controller_permissions(subjects, "hub").subscribe)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("seed", range(4))
def test_a_walk_while_objects_come_and_go_shows_each_once(
    seed: int, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_index, "MERGE_AT", 5)
    rng = random.Random(seed)
    index = StatusIndex(step)
    for i in range(150):
        index.update(status(i, rng))
    present_throughout = {cid(i) for i in range(150)}
    seen: list[str] = []
    after = None
    while True:
        page = index.page(Query(after=after, limit=rng.randint(1, 12)))
        seen.extend(row.cid for row in page.rows)
        for _ in range(rng.randint(0, 6)):  # between pages: adds, changes, removals
            i = rng.randrange(300)
            if rng.random() < 0.3:
                index.remove(cid(i))
                present_throughout.discard(cid(i))
            else:
                index.update(status(i, rng))
        if page.next is None:
            break
        after = page.next
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert present_throughout <= set(seen)


def test_a_page_merges_both_runs_and_the_side_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_index, "MERGE_AT", 4)  # the small run is due past 16 rows
    rng = random.Random(3)
    index = StatusIndex(AT_ONCE)
    model: dict[str, Row] = {}
    for i in rng.sample(range(1000), 66):  # CIDs of each source interleave in CID order
        s = status(i, rng)
        index.update(s)
        model[s.cid] = row_of(s)
    index.remove(next(iter(model)))
    del model[next(iter(model))]
    sources = (index._main.live, index._recent.live, len(index._delta))
    assert all(sources) and sum(sources) == len(model)
    for query in (Query(limit=7), Query(state="placed", limit=3), Query(node="n2", limit=5)):
        every = [row for _, row in sorted(model.items()) if query.matches(row)]
        assert walk(index, query) == every


def test_filling_an_index_copies_rows_linearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """One sorted run copied every row at each merge: n * n / (2 * MERGE_AT) rows to fill it,
    a third of the leader's first walk at 10M objects. Two runs copy a few dozen times n."""
    merge_at, count = 64, 40_000
    monkeypatch.setattr(status_index, "MERGE_AT", merge_at)
    copied = 0
    merged = Columns.merged

    def counting(run: Columns, other: Columns) -> Columns:
        nonlocal copied
        copied += len(run) + len(other)
        return merged(run, other)

    monkeypatch.setattr(Columns, "merged", counting)
    index = StatusIndex(AT_ONCE)
    for i in range(count):
        index.update(ObjectStatus(cid(i), "placed", (Location("n1", "v0"),), 1, "default"))
    assert len(index) == count and index.get(cid(count - 1)) is not None
    assert copied < 50 * count < count * count // (2 * merge_at)


def test_a_merge_keeps_keys_sorted_and_drops_dead_rows() -> None:
    def values(i: int) -> status_columns.Values:
        return (0, 0, 1, 1, 0, i, 0, (1, 2, 3, 4, 5)[: i % 6])

    even = Columns.of([(cid(i).encode(), values(i)) for i in sorted(range(0, 40, 2), key=cid)])
    odd = Columns.of([(cid(i).encode(), values(i)) for i in sorted(range(1, 40, 2), key=cid)])
    even.kill(even.find(cid(4).encode()))
    both = even.merged(odd)
    keys = both.keys.tolist()
    assert keys == sorted(keys) and len(both) == 39 and both.dead == 0
    assert both.find(cid(4).encode()) == -1 and both.find(cid(1000).encode()) == -1
    at = both.find(cid(9).encode())
    assert dict(both.gathered([at]))[cid(9).encode()] == (0, 0, 1, 1, 0, 9, 0, (1, 2, 3, 0))


def test_rows_written_during_a_large_merge_are_in_its_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(status_index, "MERGE_AT", 4)  # the small run is due past 16 rows
    index = StatusIndex(merge_step=10)
    model: dict[str, Row] = {}

    def put(
        i: int, nodes: list[str], state: ObjectState = "placed", name: str | None = None
    ) -> None:
        locations = tuple(Location(n, "v0") for n in nodes)
        s = ObjectStatus(cid(i), state, locations, 3, "default", name=name or f"o{i}")
        index.update(s)
        model[s.cid] = row_of(s)

    for i in range(100):
        put(i, NODES[:2])
    index.flush()
    first = sorted(model)[0]  # in the first slice the merge copies
    last = sorted(model)[-1]  # in the last
    number = {key: i for i in range(100) if (key := cid(i)) in (first, last)}
    index.remove(first)  # dead when its slice is copied
    del model[first]
    for i in range(100, 120):
        put(i, NODES[:1])
    assert index._merging is not None  # the large merge began, its first slice copied
    put(number[first], NODES, name="back")  # brought back after its slice: node ids spill
    put(number[last], NODES[3:], state="degraded", name="renamed")  # before its slice
    for i in (5, 50):  # somewhere in between
        index.remove(cid(i))
        del model[cid(i)]
    while index._merging is not None:
        assert walk(index, Query(limit=7)) == [row for _, row in sorted(model.items())]
    assert index.get(first) == model[first]
    assert [row.cid for row in walk(index, Query(node="n6"))] == sorted([first, last])
    assert walk(index, Query(limit=7)) == [row for _, row in sorted(model.items())]
    assert len(index) == len(model) == 118


def test_a_large_merge_without_memory_loses_no_row(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(status_index, "MERGE_AT", 4)
    failed: list[bool] = []
    merge = status_columns.Merge

    def once_failing(big: Columns, small: Columns) -> status_columns.Merge:
        if not failed:
            failed.append(True)
            raise MemoryError("no room for the copy")
        return merge(big, small)

    monkeypatch.setattr(status_index, "Merge", once_failing)
    index = StatusIndex()
    rng = random.Random(7)
    model = {}
    for i in range(300):
        s = status(i, rng)
        index.update(s)
        model[s.cid] = row_of(s)
    assert failed and "no memory to merge the small run into the large one" in caplog.text
    assert walk(index, Query(limit=9)) == [row for _, row in sorted(model.items())]
    index.flush()
    assert index.page(Query(limit=500)).rows == [row for _, row in sorted(model.items())]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_merge_in_slices_equals_one_in_one_piece(step: int) -> None:
    rng = random.Random(step)

    def run(keys: list[bytes]) -> Columns:
        rows: list[tuple[bytes, status_columns.Values]] = [
            (key, (0, 0, 1, 1, 0, len(key), 0, (1, 2))) for key in sorted(set(keys))
        ]
        return Columns.of(rows)

    # Keys of several widths (CIDs of other hashes are longer), some rows dead on each side.
    keys = [bytes(rng.choices(b"abcdef", k=rng.randint(3, 9))) for _ in range(400)]
    unique = sorted(set(keys))
    rng.shuffle(unique)
    big, small = run(unique[:300]), run(unique[300:])
    for r in (big, small):
        for pos in rng.sample(range(len(r)), 20):
            r.kill(pos)
    merge = status_columns.Merge(big, small)
    merged = None
    calls = 0
    while merged is None:
        merged, calls = merge.step(step), calls + 1
    whole = big.merged(small)
    assert all((a == b).all() for a, b in zip(merged.columns(), whole.columns(), strict=True))
    assert calls == max(1, -(-len(big) // step)) and merged.dead == 0
