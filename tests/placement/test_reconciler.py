"""The reconciler and its adapters: one unit case per scenario of the controller issue."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import pytest

from cim_place.errors import PolicyError
from cim_place.objectstore.cid import RAW, make_cid
from cim_place.placement.model import (
    LabelOp,
    NodeMap,
    PlacedObject,
    SpreadLevel,
    Volume,
    VolumeState,
)
from cim_place.placement.planner import plan
from cim_place.placement.reconcile_model import (
    REPLACING,
    Drop,
    FailedTask,
    Fetch,
    InFlightTask,
    ObjectInfo,
    ReconcileInput,
    ReconcileResult,
    Replica,
    is_repair,
)
from cim_place.placement.reconciler import rebalance_candidates, reconcile
from cim_place.placement.rules import (
    CompiledPolicy,
    Liveness,
    NodeLiveness,
    compile_policy,
    liveness_from,
    node_map_from,
    preference_factor,
    rule_for,
)
from cim_place.placement.status import ObjectStatus
from cim_place.policies.model import (
    BUILTIN_DEFAULT,
    Constraints,
    Consumer,
    LabelRequirement,
    Locality,
    Policy,
    Preference,
    Repair,
    Replicas,
    Spread,
)

GIB = 1 << 30
CID = make_cid(RAW, b"the object")
OBJ = ObjectInfo(cid=CID, size=1000, first_seen=0.0, owner="alice", name="docs/a.pdf")
NOW = 10_000.0


@dataclass(frozen=True)
class Vol:
    name: str
    capacity: int
    used: int
    free: int


@dataclass(frozen=True)
class Rec:
    node: str
    labels: dict[str, str]
    tags: tuple[str, ...] = ()
    volumes: tuple[Vol, ...] = (Vol("v", GIB, 0, GIB),)
    heartbeat_at: float = NOW
    extra: dict[str, str] = field(default_factory=dict)


def records(n: int = 4, *, tags: dict[str, tuple[str, ...]] | None = None) -> list[Rec]:
    tags = tags or {}
    return [
        Rec(f"n{i}", {"region": "eu", "zone": f"z{i}"}, tags.get(f"n{i}", ()))
        for i in range(1, n + 1)
    ]


def nodes(recs: Sequence[Rec], *, draining: Iterable[str] = ()) -> NodeMap:
    return node_map_from(recs, now=NOW, late_after=15, down_after=30, draining=set(draining))


def policy(replicas: int = 3, min_copies: int | None = None, **kw: object) -> CompiledPolicy:
    p = Policy(
        name="p",
        replicas=Replicas(min=replicas if min_copies is None else min_copies, max=replicas),
        spread=Spread("zone", 1),
        repair=Repair(grace_seconds=900),
        **kw,  # type: ignore[arg-type]
    )
    return compile_policy(p)


def up(recs: Sequence[Rec]) -> dict[str, NodeLiveness]:
    return {r.node: NodeLiveness(Liveness.UP) for r in recs}


def run(
    nm: NodeMap,
    confirmed: Iterable[Replica],
    *,
    pol: CompiledPolicy | None = None,
    liveness: dict[str, NodeLiveness] | None = None,
    in_flight: Sequence[InFlightTask] = (),
    **kw: object,
) -> ReconcileResult:
    node_ids = {v.node for v in nm.volumes}
    return reconcile(
        ReconcileInput(
            obj=kw.pop("obj", OBJ),  # type: ignore[arg-type]
            policy=pol or policy(),
            node_map=nm,
            confirmed=frozenset(confirmed),
            liveness=liveness
            if liveness is not None
            else {n: NodeLiveness(Liveness.UP) for n in node_ids},
            now=kw.pop("now", NOW),  # type: ignore[arg-type]
            in_flight=in_flight,
            **kw,  # type: ignore[arg-type]
        )
    )


def flights(actions: Iterable[Fetch | Drop], since: float = NOW) -> list[InFlightTask]:
    return [
        InFlightTask(
            kind=a.kind, node=a.node, volume=a.volume, since=since, generation=a.generation
        )
        for a in actions
    ]


def replicas_of(vids: Iterable[str]) -> set[Replica]:
    out = set()
    for vid in vids:
        node, _, volume = vid.partition("/")
        out.add((node, volume))
    return out


def condition(result: ReconcileResult, kind: str) -> tuple[bool, str, str]:
    c = next(c for c in result.status.conditions if c.type == kind)
    return c.status, c.reason, c.message


# -- scenarios ------------------------------------------------------------------------------------


def test_three_copies_in_three_zones_from_one_copy() -> None:
    nm = nodes(records(4))
    first = run(nm, {("n1", "v")})
    assert len(first.fetches) == 2 and not first.drops
    zones = {nm.get(f"{f.node}/{f.volume}").zone for f in first.fetches}  # type: ignore[union-attr]
    assert len(zones) == 2 and "z1" not in zones
    assert all(f.holders == ("n1",) for f in first.fetches)
    assert not any(is_repair(f) for f in first.fetches)  # first placement is no repair
    assert first.status.state == "progressing"
    assert first.desired[0] == "n1/v" or "n1/v" in first.desired
    # Level-triggered: with those fetches in flight, nothing new.
    second = run(nm, {("n1", "v")}, in_flight=flights(first.actions))
    assert second.actions == ()
    assert sorted(loc.state for loc in second.status.locations) == [
        "fetching",
        "fetching",
        "pinned",
    ]
    # Confirmed: placed, nothing to do.
    done = run(nm, replicas_of(first.desired), previous=second.status, now=NOW + 5)
    assert done.actions == ()
    assert done.status.state == "placed"
    assert done.status.pinned == 3
    placed = condition(done, "Placed")
    assert placed[0] and placed[1] == "DesiredMet"
    # The Placed condition flipped now; Degraded stayed False and keeps its transition time.
    conds = {c.type: c for c in done.status.conditions}
    assert conds["Placed"].last_transition == NOW + 5
    assert conds["Degraded"].last_transition == NOW
    # Nothing changed: the very same status (so the locations store skips the write), also after
    # a round trip through its JSON form.
    later = run(nm, replicas_of(first.desired), previous=done.status, now=NOW + 60)
    assert later.status == done.status
    stored = ObjectStatus.decode(done.status.encode())
    assert run(nm, replicas_of(first.desired), previous=stored, now=NOW + 90).status == stored


def _placed(nm: NodeMap, pol: CompiledPolicy | None = None) -> set[Replica]:
    rule = (pol or policy()).rule
    return replicas_of(plan(PlacedObject(CID, OBJ.size), rule, nm).desired)


def test_late_node_is_not_acted_on() -> None:
    recs = records(4)
    nm = nodes(recs)
    held = _placed(nm)
    late_node = sorted(held)[0][0]
    liveness = up(recs) | {late_node: NodeLiveness(Liveness.LATE, NOW - 20)}
    result = run(nm, held, liveness=liveness)
    assert result.actions == ()
    states = {(loc.node, loc.state) for loc in result.status.locations}
    assert (late_node, "late") in states
    assert result.status.state == "degraded"
    assert condition(result, "Degraded")[1] == "WaitingForGrace"
    assert result.requeue_after is None


def test_node_lost_after_grace_is_replaced() -> None:
    recs = records(4)
    nm = nodes(recs)
    held = _placed(nm)
    gone = sorted(held)[0][0]
    spare = ({"n1", "n2", "n3", "n4"} - {n for n, _ in held}).pop()
    # The node's record expired from the bucket; its last record is kept, so it is down.
    recs_down = [replace(r, heartbeat_at=NOW - 100) if r.node == gone else r for r in recs]
    nm_down = nodes(recs_down)
    assert nm_down.get(f"{gone}/v").state is VolumeState.DOWN  # type: ignore[union-attr]
    liveness = liveness_from(recs_down, now=NOW, late_after=15, down_after=30)
    assert liveness[gone] == NodeLiveness(Liveness.DOWN, NOW - 70)
    within = run(nm_down, held, liveness=liveness)
    assert within.actions == ()
    assert within.requeue_after == pytest.approx(900 - 70)
    assert {(loc.node, loc.state) for loc in within.status.locations} >= {(gone, "late")}
    after = run(nm_down, held, liveness=liveness, now=NOW - 70 + 900)
    assert after.fetches == (
        Fetch(spare, "v", after.fetches[0].holders, 0, REPLACING, repair=True),
    )
    assert gone not in after.fetches[0].holders
    assert is_repair(after.fetches[0])  # under repair.max_concurrent and repair.bandwidth
    assert not after.drops
    assert (gone, "lost") in {(loc.node, loc.state) for loc in after.status.locations}
    # Once the replacement is confirmed: placed, and the lost copy is never dropped.
    healed = run(nm_down, held | {(spare, "v")}, liveness=liveness, now=NOW - 70 + 1000)
    assert healed.actions == ()
    assert healed.status.state == "placed"


def test_down_node_without_a_record_is_kept_within_grace() -> None:
    recs = records(4)
    held = _placed(nodes(recs))
    gone = sorted(held)[0][0]
    rest = [r for r in recs if r.node != gone]
    liveness = liveness_from(rest, now=NOW, late_after=15, down_after=30, departed={gone: NOW})
    result = run(nodes(rest), held, liveness=liveness)
    assert result.actions == ()
    assert result.requeue_after == pytest.approx(900)
    assert f"{gone}/v" in result.desired


def test_policy_change_three_to_two_drops_one_never_the_last() -> None:
    nm = nodes(records(4))
    held = _placed(nm)
    result = run(nm, held, pol=policy(2))
    assert len(result.drops) == 1 and not result.fetches
    dropped = (result.drops[0].node, result.drops[0].volume)
    assert dropped in held and f"{dropped[0]}/v" not in result.desired
    assert result.status.state == "placed"
    # Reconciling again with the drop in flight does nothing more.
    again = run(nm, held, pol=policy(2), in_flight=flights(result.actions))
    assert again.actions == ()
    # Down to one copy wanted, with min 1: drops to one, never to zero.
    one = run(nm, held, pol=policy(1))
    assert len(one.drops) == 2
    # A policy whose min is 0 still never drops the last copy.
    last = run(nm, {("n1", "v"), ("n2", "v")}, pol=policy(1, 0, expire_after_seconds=10**9))
    assert len(last.drops) == 1


def test_min_floor_holds_surplus_copies() -> None:
    nm = nodes(records(4))
    held = _placed(nm)
    # replicas 2 but min 3 (not a valid policy, but the floor must hold whatever the rule says).
    pol = policy(2)
    pol = replace(pol, min_copies=3)
    result = run(nm, held, pol=pol)
    assert result.drops == ()
    assert result.status.state == "placed"
    assert "fewer than 3 pinned copies" in condition(result, "Placed")[2]


def test_drain_moves_copies_then_leaves_nothing() -> None:
    recs = records(4)
    held = _placed(nodes(recs))
    drained = sorted(held)[0][0]
    spare = ({"n1", "n2", "n3", "n4"} - {n for n, _ in held}).pop()
    nm = nodes(recs, draining={drained})
    first = run(nm, held)
    assert [(f.node, f.volume) for f in first.fetches] == [(spare, "v")]
    assert first.drops == ()  # copy before drop
    waiting = run(nm, held, in_flight=flights(first.actions))
    assert waiting.actions == ()
    moved = run(nm, held | {(spare, "v")})
    assert [(d.node, d.reason) for d in moved.drops] == [(drained, "volume draining")]
    assert moved.status.state == "placed"
    final = run(nm, (held | {(spare, "v")}) - {(drained, "v")})
    assert final.actions == ()
    assert final.status.state == "placed"
    assert drained not in {loc.node for loc in final.status.locations}


def test_expiry_drops_every_copy_and_says_why() -> None:
    nm = nodes(records(4))
    held = _placed(nm)
    pol = policy(3, expire_after_seconds=100)
    before = run(nm, held, pol=pol, now=50.0)
    assert before.actions == ()
    assert before.requeue_after == pytest.approx(50.0)
    expired = run(nm, held, pol=pol, now=200.0)
    assert sorted((d.node, d.volume) for d in expired.drops) == sorted(held)
    assert not expired.fetches
    assert expired.status.state == "expired" and expired.status.desired == 0
    assert not expired.gone
    status, reason, message = condition(expired, "Placed")
    assert not status and reason == "Expired" and "expired" in message
    again = run(nm, held, pol=pol, now=201.0, in_flight=flights(expired.actions))
    assert again.actions == () and again.status.state == "expired" and not again.gone
    gone = run(nm, set(), pol=pol, now=300.0)
    assert gone.status.state == "expired" and condition(gone, "Placed")[1] == "Expired"
    assert condition(gone, "Degraded")[0] is False  # never counted as lost
    assert gone.gone and gone.actions == ()


def test_unsatisfiable_constraints_degrade_with_reason() -> None:
    recs = records(4, tags={"n1": ("ssd",), "n2": ("ssd",)})
    nm = nodes(recs)
    pol = policy(3, constraints=Constraints(tags=("ssd",)))
    result = run(nm, {("n1", "v")}, pol=pol)
    assert [(f.node, f.volume) for f in result.fetches] == [("n2", "v")]
    done = run(nm, {("n1", "v"), ("n2", "v")}, pol=pol)
    assert done.actions == ()
    assert done.status.state == "degraded"
    status, reason, message = condition(done, "Degraded")
    assert status and reason == "Unsatisfiable"
    assert "only 2 of 3 replicas" in message


def test_lost_when_no_copy_anywhere() -> None:
    recs = records(4)
    nm = nodes(recs)
    liveness = up(recs) | {"n1": NodeLiveness(Liveness.DOWN, 0.0)}
    result = run(nm, {("n1", "v")}, liveness=liveness)
    assert result.actions == ()  # nothing to fetch from
    assert result.status.state == "lost"
    assert condition(result, "Degraded")[:2] == (True, "Lost")
    # A copy on a late node is not lost: the missing copies are fetched from it.
    late = run(nm, {("n1", "v")}, liveness=up(recs) | {"n1": NodeLiveness(Liveness.LATE, 0)})
    assert late.status.state == "progressing"
    assert [f.holders for f in late.fetches] == [("n1",), ("n1",)]


def test_failed_fetch_backs_off_then_bumps_generation() -> None:
    nm = nodes(records(4))
    first = run(nm, {("n1", "v")}, generation=7)
    target = first.fetches[0]
    assert target.generation == 7
    failure = FailedTask(
        kind="fetch",
        node=target.node,
        volume=target.volume,
        generation=7,
        failed_at=NOW - 1,
        reason="holder unreachable",
    )
    waiting = run(nm, {("n1", "v")}, generation=7, failed=[failure])
    assert (target.node, target.volume) not in {(f.node, f.volume) for f in waiting.fetches}
    assert waiting.requeue_after == pytest.approx(9.0)
    retried = run(nm, {("n1", "v")}, generation=7, failed=[failure], now=NOW + 10)
    again = [f for f in retried.fetches if (f.node, f.volume) == (target.node, target.volume)]
    assert again and again[0].generation == 8
    # Given up: the planner is offered another volume.
    hopeless = replace(failure, failures=5)
    other = run(nm, {("n1", "v")}, failed=[hopeless], now=NOW + 10_000)
    assert (target.node, target.volume) not in {(f.node, f.volume) for f in other.fetches}
    assert len(other.fetches) == 2


def test_rebalance_after_a_node_joins_is_copy_then_drop() -> None:
    recs = records(4)
    nm4 = nodes(recs)
    objects = [(PlacedObject(make_cid(RAW, bytes([i, 1])), 1000), i) for i in range(200)]
    current = {o.cid: plan(o, policy().rule, nm4).desired for o, _ in objects}
    nm5 = nodes([*recs, Rec("n5", {"region": "eu", "zone": "z5"})])
    candidates = rebalance_candidates(
        ((o, current[o.cid]) for o, _ in objects), policy().rule, nm5, limit=1000
    )
    # About 3/5 of the objects get a replica on the new node, never more than needed.
    assert 0.4 < len(candidates) / len(objects) < 0.8
    assert (
        len(
            rebalance_candidates(
                ((o, current[o.cid]) for o, _ in objects), policy().rule, nm5, limit=3
            )
        )
        == 3
    )
    obj = candidates[0]
    info = ObjectInfo(cid=obj.cid, size=obj.size, first_seen=0.0)
    held = replicas_of(current[obj.cid])
    plain = run(nm5, held, obj=info)
    assert plain.actions == ()  # keep_current: a new node receives nothing by itself
    moving = run(nm5, held, obj=info, rebalance=True)
    assert [(f.node, f.reason) for f in moving.fetches] == [("n5", "rebalance")]
    assert moving.drops == ()
    confirmed = held | {("n5", "v")}
    trimmed = run(nm5, confirmed, obj=info)
    assert len(trimmed.drops) == 1 and trimmed.drops[0].node != "n5"
    assert trimmed.status.state == "placed"


# -- adapters -------------------------------------------------------------------------------------


def test_rule_for_translates_a_policy() -> None:
    p = Policy(
        name="docs",
        replicas=Replicas(min=2, max=4),
        spread=Spread("host", 2),
        constraints=Constraints(
            tags=("ssd",),
            labels=(
                LabelRequirement("zone", "in", ("z1", "z2")),
                LabelRequirement("country", "!=", ("us",)),
                LabelRequirement("rack", "exists"),
                LabelRequirement("legacy", "not exists"),
            ),
            exclude_nodes=("archive",),
        ),
        preferences=(
            Preference(weight=100, tag="nvme"),
            Preference(weight=50, label=LabelRequirement("zone", "=", ("z1",))),
        ),
        locality=Locality(near=("shop", "blog"), min_local=1, mode="hard"),
    )
    consumers = [
        Consumer("shop", {"region": "eu", "zone": "z1", "host": "web1"}),
        Consumer("blog", {"zone": "z2"}),
    ]
    rule = rule_for(p, consumers)
    assert (rule.replicas, rule.min) == (4, 2)
    assert rule.spread is SpreadLevel.ZONE
    assert (rule.cap_level, rule.max_per_domain) == (SpreadLevel.HOST, 2)
    assert rule.required_tags == {"ssd"}
    assert rule.excluded_nodes == {"archive"}
    ops = {(r.key, r.op) for r in rule.requirements}
    assert ops == {
        ("zone", LabelOp.IN),
        ("country", LabelOp.NOT_IN),
        ("rack", LabelOp.EXISTS),
        ("legacy", LabelOp.NOT_EXISTS),
    }
    weights = sorted(pref.weight for pref in rule.preferences)
    assert weights == [preference_factor(50), preference_factor(100)]
    assert preference_factor(100) == 2.0
    assert rule.locality is not None and rule.locality.hard
    assert {r.key for r in rule.locality.requirements} == {"region", "zone", "host"}
    # The second consumer counts as the first does: its own min_local copies, hard too.
    (blog,) = rule.also_near
    assert blog.hard and blog.min_local == 1
    assert [(r.key, r.op, r.values) for r in blog.requirements] == [
        ("zone", LabelOp.IN, frozenset({"z2"}))
    ]
    with pytest.raises(PolicyError, match="not declared"):
        rule_for(p, consumers[1:])


def test_rule_for_spread_defaults() -> None:
    default = rule_for(Policy(name="d", replicas=Replicas(3, 3)))
    assert default.max_per_domain is None and default.spread is SpreadLevel.ZONE
    region = rule_for(Policy(name="r", replicas=Replicas(2, 2), spread=Spread("region", 1)))
    assert region.spread is SpreadLevel.REGION and region.max_per_domain == 1
    # The built-in default spreads one per zone while zones last: one host still gets 3 copies.
    builtin = rule_for(BUILTIN_DEFAULT)
    assert builtin.max_per_domain is None
    one_host = NodeMap(
        node_map_from(
            [Rec("solo", {}, volumes=tuple(Vol(f"d{i}", GIB, 0, GIB) for i in range(3)))],
            now=NOW,
            late_after=15,
            down_after=30,
        ).volumes
    )
    assert len(plan(PlacedObject(CID, 10), builtin, one_host).desired) == 3


def test_node_map_from_heartbeats() -> None:
    recs = [
        Rec("a", {"zone": "z1"}, ("ssd",), (Vol("d0", 100, 40, 60), Vol("d1", 10, 0, 10))),
        Rec("b", {"zone": "z2", "host": "box"}, heartbeat_at=NOW - 20),
        Rec("c", {"zone": "z3"}, heartbeat_at=NOW - 31),
        Rec("d", {"zone": "z4"}),
    ]
    nm = node_map_from(recs, now=NOW, late_after=15, down_after=30, draining={"d", "c"})
    a0 = nm.get("a/d0")
    assert a0 is not None
    assert (a0.capacity, a0.free, a0.host, a0.zone, a0.tags) == (
        100,
        60,
        "a",
        "z1",
        frozenset({"ssd"}),
    )
    assert nm.get("b/v").host == "box"  # type: ignore[union-attr]
    assert nm.get("b/v").state is VolumeState.UP  # type: ignore[union-attr]  # late stays up
    assert nm.get("c/v").state is VolumeState.DOWN  # type: ignore[union-attr]
    assert nm.get("d/v").state is VolumeState.DRAINING  # type: ignore[union-attr]
    live = liveness_from(recs, now=NOW, late_after=15, down_after=30)
    assert [live[n].state for n in "abcd"] == [
        Liveness.UP,
        Liveness.LATE,
        Liveness.DOWN,
        Liveness.UP,
    ]
    with pytest.raises(ValueError, match="late_after"):
        node_map_from(recs, now=NOW, late_after=40, down_after=30)


def test_planner_extensions_used_by_the_adapter() -> None:
    """What rule_for needs of the planner: exists / not exists, requirement preferences, and a
    cap counted at another level than the spread."""
    import numpy as np

    from cim_place.placement.batch import plan_batch
    from cim_place.placement.model import LabelRequirement as Req
    from cim_place.placement.model import PlacementRule
    from cim_place.placement.model import Preference as Pref
    from cim_place.placement.planner import plan_key

    vols = [
        Volume(
            node=f"h{h}",
            name=f"d{d}",
            capacity=GIB,
            free=GIB,
            labels={"zone": f"z{h % 2}", **({"rack": "r1"} if h < 3 else {})},
        )
        for h in range(6)
        for d in range(2)
    ]
    nm = NodeMap(vols)
    rack = plan(
        PlacedObject(CID, 10),
        PlacementRule(replicas=2, requirements=(Req("rack", LabelOp.EXISTS),)),
        nm,
    )
    assert all(nm.get(v).labels.get("rack") for v in rack.desired)  # type: ignore[union-attr]
    no_rack = PlacementRule(replicas=2, requirements=(Req("rack", LabelOp.NOT_EXISTS),))
    assert not any(
        nm.get(v).labels.get("rack")  # type: ignore[union-attr]
        for v in plan(PlacedObject(CID, 10), no_rack, nm).desired
    )
    # Four copies, spread over zones first, at most one per host: four distinct hosts.
    capped = PlacementRule(replicas=4, cap_level=SpreadLevel.HOST, max_per_domain=1)
    hosts = [nm.get(v).node for v in plan(PlacedObject(CID, 10), capped, nm).desired]  # type: ignore[union-attr]
    assert len(hosts) == 4 and len(set(hosts)) == 4
    # A cap wider than the spread is left to the scalar walk: batch and scalar agree.
    wide = PlacementRule(
        replicas=3,
        spread=SpreadLevel.HOST,
        cap_level=SpreadLevel.ZONE,
        max_per_domain=2,
        preferences=(Pref(3.0, requirement=Req("rack", LabelOp.EXISTS)),),
    )
    keys = np.arange(1, 200, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    sizes = np.full(len(keys), 10, dtype=np.int64)
    table = plan_batch(keys, sizes, wide, nm)
    for k, row in zip(keys.tolist(), table.tolist(), strict=True):
        scalar = plan_key(k, 10, wide, nm, keep_current=False, explain=False).desired
        assert [nm.volumes[i].id for i in row if i != 0xFFFF] == list(scalar)
        zones = [nm.get(v).zone for v in scalar]  # type: ignore[union-attr]
        assert max(zones.count(z) for z in zones) <= 2


def test_node_records_of_the_registry_fit_the_snapshot_protocol() -> None:
    from cim_place.cluster.state.nodes import NodeRecord, VolumeStatus

    record = NodeRecord(
        node="leaf1",
        labels={"zone": "z1"},
        tags=("ssd",),
        volumes=(VolumeStatus("data", 1000, 100, 900),),
        heartbeat_at=NOW - 1,
    )
    nm = node_map_from([record], now=NOW, late_after=15, down_after=30)
    volume = nm.get("leaf1/data")
    assert volume is not None and (volume.free, volume.used, volume.host) == (900, 100, "leaf1")
    assert liveness_from([record], now=NOW, late_after=15, down_after=30)["leaf1"].state is (
        Liveness.UP
    )


def test_removal_drops_every_copy_even_below_min() -> None:
    """An explicit removal (`cim-place rm`) is not held back by the floor that protects content
    from the controller's own decisions: min 3 of 3, and still every copy goes."""
    nm = nodes(records(4))
    held = _placed(nm)
    pol = replace(policy(3), min_copies=3)
    kept = run(nm, held, pol=pol)
    assert kept.actions == ()  # the floor, without a removal
    removed = run(nm, held, pol=pol, removed="removed by ana@host")
    assert sorted((d.node, d.volume) for d in removed.drops) == sorted(held)
    assert not removed.fetches and removed.desired == ()
    assert removed.status.state == "removed"
    status, reason, message = condition(removed, "Placed")
    assert not status and reason == "Removed" and "ana@host" in message
    again = run(nm, held, pol=pol, removed="x", in_flight=flights(removed.actions))
    assert again.actions == ()  # level-triggered: the drops in flight are not asked again
    gone = run(nm, set(), pol=pol, removed="x")
    assert gone.status.state == "removed" and gone.actions == ()
    assert "every copy dropped" in condition(gone, "Placed")[2]


def test_removal_waits_for_a_fetch_in_flight() -> None:
    nm = nodes(records(4))
    held = sorted(_placed(nm))
    fetching = [InFlightTask(kind="fetch", node=held[0][0], volume=held[0][1], since=NOW)]
    result = run(nm, held[1:], removed="x", in_flight=fetching)
    assert sorted((d.node, d.volume) for d in result.drops) == sorted(held[1:])
