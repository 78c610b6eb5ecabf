"""The projection's 32-bit columns: values that do not fit widen the column, nothing is lost."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.events.types import ObjectStored, event_envelope
from cim_place.objectstore.cid import RAW, Cid, make_cid

A = make_cid(RAW, b"object a")
B = make_cid(RAW, b"object b")


def stored(root: Cid, size: int, name: str | None = "report.pdf") -> ObjectStored:
    return ObjectStored(
        root=root, size=size, blocks=1, volume="v1", owner="alice", name=name, metadata={}
    )


def test_big_sizes_and_sequences_widen_their_columns() -> None:
    projection = Projection()
    projection.apply_event(event_envelope(stored(A, 1024), owner="n1").with_sequence(7), at=10.5)
    big = event_envelope(stored(B, 5 << 30), owner="n1").with_sequence(2**33)
    projection.apply_event(big, at=20.0)
    a, b = projection.object(A), projection.object(B)
    assert a is not None and b is not None
    assert (a.size, a.sequence, a.first_seen) == (1024, 7, 10.0)  # whole seconds
    assert (b.size, b.sequence) == (5 << 30, 2**33)
    assert projection.total_size == 1024 + (5 << 30)
    assert projection.verified_at(B) == {("n1", "v1"): 20.0}
    assert a.name == b.name == "report.pdf"


def test_a_forgotten_slot_is_reused_with_fresh_columns() -> None:
    projection = Projection()
    projection.apply_event(event_envelope(stored(A, 1024), owner="n1").with_sequence(1), at=5.0)
    projection.forget(A)
    assert A not in projection and len(projection) == 0
    projection.apply_event(
        event_envelope(stored(B, 2048, name=None), owner="n2").with_sequence(2), at=9.0
    )
    b = projection.object(B)
    assert b is not None
    assert (b.size, b.name, b.first_seen, b.replicas) == (2048, None, 9.0, {("n2", "v1")})
    assert projection.cids_on("n2") == {B} and projection.cids_on("n1") == set()
    assert list(projection.cids()) == [B]


NODES = [f"n{i}" for i in range(7)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5), st.sampled_from(NODES), st.sampled_from(["v1", "v2"]), st.booleans()
        ),
        min_size=20,
        max_size=120,
    ),
    st.sets(st.sampled_from(NODES)),
)
def test_the_objects_on_a_location_agree_with_a_dict(
    steps: list[tuple[int, str, str, bool]], asked: set[str]
) -> None:
    """By node, by volume and by a set of nodes (compared cell by cell for a few locations,
    through a table for more), with more than the 4 inline replicas of an object (the spill)."""
    projection = Projection()
    model: dict[Cid, set[tuple[str, str]]] = {}
    cids = [make_cid(RAW, f"object {i}".encode()) for i in range(6)]
    for sequence, (i, node, volume, drop) in enumerate(steps, start=1):
        cid = cids[i]
        if drop:
            projection.drop_replica(cid, node, volume)
            model.get(cid, set()).discard((node, volume))
        else:
            event = ObjectStored(
                root=cid, size=10, blocks=1, volume=volume, owner="o", name=None, metadata={}
            )
            projection.apply_event(event_envelope(event, owner=node).with_sequence(sequence))
            model.setdefault(cid, set()).add((node, volume))
    for node in NODES:
        assert projection.cids_on(node) == {c for c, at in model.items() if node in dict(at)}
        for volume in ("v1", "v2"):
            assert projection.cids_on(node, volume) == {
                c for c, at in model.items() if (node, volume) in at
            }
    for nodes in (asked, set(NODES[1:])):
        assert projection.cids_on_nodes(nodes) == {
            c for c, at in model.items() if nodes.intersection(n for n, _ in at)
        }
