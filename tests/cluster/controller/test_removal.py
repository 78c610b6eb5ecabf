"""Removal from the domain without NATS: the tombstone event, the projection's rules for it, the
policy flags it reads (`protected`, `keep_versions`), and the agent's collection of a dropped DAG.
The NATS half (the controller's API, the agents, the disk given back) is in
tests/cli/test_operator_cli.py."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest

from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.events.types import (
    AnyEvent,
    ObjectDeleted,
    ObjectStored,
    TaskCompleted,
    event_envelope,
    parse_event,
)
from cim_place.cluster.nats.envelope import Envelope
from cim_place.cluster.tasks.model import Task
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import RAW, Cid, make_cid
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream
from cim_place.policies.codec import policy_to_dict
from cim_place.policies.problems import PolicyValidationError
from cim_place.policies.validate import load_text, policy_from_dict

A = make_cid(RAW, b"removed object")
_sequence = itertools.count(1)


def envelope(event: AnyEvent, node: str) -> Envelope:
    return event_envelope(event, owner=node).with_sequence(next(_sequence))


def stored(root: Cid, volume: str = "v1") -> ObjectStored:
    return ObjectStored(root=root, size=10, blocks=1, volume=volume, owner="ana")


def test_the_tombstone_round_trips() -> None:
    event = ObjectDeleted(root=A, by="ana@host", reason="GDPR", names=("a", "b"))
    assert parse_event(envelope(event, "hub")) == event


def test_the_tombstone_marks_a_tracked_object_removed() -> None:
    projection = Projection()
    untracked = make_cid(RAW, b"never stored")
    assert projection.apply_event(envelope(ObjectDeleted(root=untracked, by="x"), "hub")) == set()
    projection.apply_event(envelope(stored(A), "n1"), node="n1")
    dirty = projection.apply_event(envelope(ObjectDeleted(root=A, by="ana"), "hub"), node="hub")
    assert dirty == {A}
    tombstone = projection.removal(A)
    assert tombstone is not None and tombstone.by == "ana"


def test_a_copy_confirmed_during_the_removal_keeps_it_removed() -> None:
    projection = Projection()
    projection.apply_event(envelope(stored(A), "n1"), node="n1")
    projection.apply_event(envelope(ObjectDeleted(root=A, by="ana"), "hub"), node="hub")
    # A fetch that was in flight lands on n2 while n1's copy still exists: dropped with it.
    projection.apply_event(envelope(stored(A), "n2"), node="n2")
    assert projection.removal(A) is not None


def test_storing_again_after_every_copy_is_gone_is_a_new_add() -> None:
    from cim_place.cluster.events.types import ObjectRemoved

    projection = Projection()
    projection.apply_event(envelope(stored(A), "n1"), node="n1")
    projection.apply_event(envelope(ObjectDeleted(root=A, by="ana"), "hub"), node="hub")
    gone = ObjectRemoved(root=A, size=10, blocks=1, volume="v1", owner="ana")
    projection.apply_event(envelope(gone, "n1"), node="n1")
    assert projection.removal(A) is not None  # still removed: status says so
    projection.apply_event(envelope(stored(A), "n3"), node="n3")
    assert projection.removal(A) is None


def test_a_fetch_still_in_flight_keeps_the_removal() -> None:
    from cim_place.cluster.events.types import ObjectRemoved

    projection = Projection()
    projection.apply_event(envelope(stored(A), "n1"), node="n1")
    task = Task.create("fetch", "n2", A, generation=1, volume="v1")
    projection.task_enqueued(task, 1.0)
    projection.apply_event(envelope(ObjectDeleted(root=A, by="ana"), "hub"), node="hub")
    gone = ObjectRemoved(root=A, size=10, blocks=1, volume="v1", owner="ana")
    projection.apply_event(envelope(gone, "n1"), node="n1")
    projection.apply_event(envelope(stored(A), "n2"), node="n2")  # the fetch lands
    assert projection.removal(A) is not None
    done = TaskCompleted(
        task_id=task.id, action="fetch", node="n2", root=A, volume="v1", attempts=1, duration=0.1
    )
    projection.apply_event(envelope(done, "n2"), node="n2")
    assert projection.removal(A) is not None


def test_protected_and_keep_versions_in_policies() -> None:
    text = (
        "name: ledger\nmatch: {name: 'ledger/*'}\nreplicas: 2\nprotected: true\nkeep_versions: 5\n"
    )
    policy = load_text(text, "p.yaml").policy_set.policies[0]
    assert policy.protected and policy.keep_versions == 5
    again = policy_from_dict(policy_to_dict(policy), "kv")
    assert again == policy
    plain = load_text("name: x\nreplicas: 2\n", "p.yaml").policy_set.policies[0]
    assert "protected" not in policy_to_dict(plain) and "keep_versions" not in policy_to_dict(plain)
    for bad, what in (
        ("protected: 'yes'", "protected"),
        ("keep_versions: 0", "keep_versions"),
        ("keep_versions: 65", "keep_versions"),
    ):
        with pytest.raises(PolicyValidationError) as info:
            load_text(f"name: x\nreplicas: 2\n{bad}\n", "p.yaml")
        assert what in str(info.value) or "true or false" in str(info.value)


def test_collect_frees_only_the_dropped_dags_blocks(tmp_path: Path) -> None:
    with ObjectStore(tmp_path / "v") as store:
        shared = chacha_stream("shared", 3 << 20).read()
        kept = store.add(io.BytesIO(shared + b"kept"), name="kept")
        dropped = store.add(io.BytesIO(shared + b"dropped tail" * 1000), name="dropped")
        other = store.add(io.BytesIO(chacha_stream("other", 2 << 20).read()), name="other")
        before = {cid: store.blocks.has(cid) for cid in store.blocks.cids()}
        used = store.blocks.used_bytes()
        store.unpin(dropped.root)
        result = store.collect([dropped.root])
        assert result.blocks_removed > 0 and result.bytes_freed > 0
        assert store.blocks.used_bytes() == used - result.bytes_freed
        for pin in (kept, other):  # every block of the other pins is still there
            assert list(store.cat(pin.root))
        assert not store.blocks.has(dropped.root)
        assert len(list(store.blocks.cids())) == len(before) - result.blocks_removed
        # Collecting a root that is pinned again removes nothing.
        assert store.collect([kept.root]).blocks_removed == 0


@pytest.mark.nats
async def test_keep_versions_purges_older_revisions_of_names(hub1: Hub) -> None:
    from cim_place.cluster.controller.removal import expire_name_versions
    from cim_place.cluster.nats.connection import connect, jetstream
    from cim_place.cluster.state.names import NameRegistry

    nc = await connect(hub1.url)
    try:
        js = jetstream(nc, "hub")
        names = NameRegistry(js)
        versions = [make_cid(RAW, f"version {i}".encode()) for i in range(5)]
        for i, version in enumerate(versions):
            await names.set("ledger/q3", version)
            await names.set("other", make_cid(RAW, f"other {i}".encode()))
        kept = {versions[-1]}  # the governed object: the name's current target

        trimmed = await expire_name_versions(js, lambda cid: 2 if cid in kept else None)
        assert trimmed == 1
        assert [r.cid for r in await names.history("ledger/q3")] == versions[-2:]
        assert len(await names.history("other")) == 5  # no policy asks: untouched
        assert (await names.resolve("ledger/q3")) == versions[-1]
    finally:
        await nc.close()
