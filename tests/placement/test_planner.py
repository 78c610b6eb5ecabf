"""The planner on hand-made topologies: spread and its fallback, hard constraints, kept copies,
bounded load, locality, preferences, reasons; and the batch planner against the scalar one."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cim_place.errors import PlacementError
from cim_place.placement import planner
from cim_place.placement.batch import NO_VOLUME, plan_batch
from cim_place.placement.eligibility import Eligibility
from cim_place.placement.model import (
    FAR,
    LabelOp,
    LabelRequirement,
    Locality,
    NodeMap,
    PlacedObject,
    Placement,
    PlacementRule,
    Preference,
    SpreadLevel,
    Verdict,
    Volume,
    VolumeState,
    object_key,
)
from cim_place.placement.planner import plan, plan_key

TIB = 2**40


def volume(
    node: str,
    name: str = "v0",
    *,
    zone: str = "z0",
    region: str = "r0",
    host: str | None = None,
    capacity: int = TIB,
    used: int = 0,
    tags: frozenset[str] = frozenset(),
    state: VolumeState = VolumeState.UP,
    **labels: str,
) -> Volume:
    all_labels = {"region": region, "zone": zone, **labels}
    if host is not None:
        all_labels["host"] = host
    return Volume(
        node=node,
        name=name,
        capacity=capacity,
        free=capacity - used,
        labels=all_labels,
        tags=tags,
        state=state,
    )


def grid(zones: int, nodes_per_zone: int, volumes_per_node: int = 1, **kw: object) -> list[Volume]:
    return [
        volume(f"n{z}-{h}", f"v{k}", zone=f"z{z}", **kw)  # type: ignore[arg-type]
        for z in range(zones)
        for h in range(nodes_per_zone)
        for k in range(volumes_per_node)
    ]


def obj(i: int, size: int = 1000) -> PlacedObject:
    return PlacedObject(cid=b"\x01\x55\x12\x20" + i.to_bytes(32, "big"), size=size)


def zones_of(nm: NodeMap, p: Placement) -> list[str]:
    out = []
    for vid in p.desired:
        v = nm.get(vid)
        assert v is not None
        out.append(v.zone)
    return out


def test_three_copies_in_three_zones_with_a_reason_for_every_volume() -> None:
    nm = NodeMap(grid(5, 3))
    p = plan(obj(1), PlacementRule(replicas=3), nm)
    assert len(p.desired) == 3
    assert len(set(zones_of(nm, p))) == 3
    assert sorted(r.volume for r in p.reasons) == sorted(v.id for v in nm.volumes)
    taken = [r for r in p.reasons if r.taken]
    assert [r.volume for r in taken] == list(p.desired)
    assert all(r.verdict is Verdict.RANKED for r in taken)
    assert not p.degraded
    refused = {r.verdict for r in p.reasons if not r.taken}
    assert refused <= {Verdict.DOMAIN_USED, Verdict.NOT_NEEDED}


def test_same_result_whatever_the_input_order() -> None:
    vols = grid(4, 3, 2, tags=frozenset({"ssd"}))
    prefs = (Preference(2.0, tag="ssd"), Preference(3.0, label=("zone", "z1")))
    rule = PlacementRule(replicas=3, preferences=prefs)
    shuffled = list(vols)
    random.Random(7).shuffle(shuffled)
    rule2 = PlacementRule(replicas=3, preferences=prefs[::-1])
    for i in range(50):
        p = plan(obj(i), rule, NodeMap(vols))
        assert p == plan(obj(i), rule2, NodeMap(shuffled))
        assert p == plan(obj(i), rule2, shuffled)  # a plain list of volumes is accepted too
        assert [r.rank for r in p.reasons if r.taken] == sorted(
            r.rank or 0 for r in p.reasons if r.taken
        )


def test_fewer_zones_than_replicas_falls_back_to_distinct_hosts() -> None:
    nm = NodeMap(grid(2, 3, 2))
    for i in range(30):
        p = plan(obj(i), PlacementRule(replicas=4), nm)
        assert len(p.desired) == 4
        assert len(set(zones_of(nm, p))) == 2
        hosts = {nm.get(v).host for v in p.desired}  # type: ignore[union-attr]
        assert len(hosts) == 4


def test_one_host_with_three_volumes_gets_three_copies() -> None:
    nm = NodeMap(volume("solo", f"v{k}") for k in range(3))
    p = plan(obj(1), PlacementRule(replicas=3), nm)
    assert sorted(p.desired) == ["solo/v0", "solo/v1", "solo/v2"]
    assert not p.degraded


def test_max_per_domain_is_hard_and_reported() -> None:
    nm = NodeMap(grid(2, 3))
    p = plan(obj(1), PlacementRule(replicas=3, max_per_domain=1), nm)
    assert len(p.desired) == 2
    assert len(set(zones_of(nm, p))) == 2
    assert p.degraded and "only 2 of 3 replicas" in p.degraded[0]
    assert any(r.verdict is Verdict.DOMAIN_FULL for r in p.reasons)


def test_hard_constraints_refuse_with_the_failed_constraint() -> None:
    vols = [
        volume("a", tags=frozenset({"ssd"}), zone="z1"),
        volume("b", tags=frozenset({"ssd"}), zone="z2", state=VolumeState.DOWN),
        volume("c", tags=frozenset({"ssd"}), zone="z3", state=VolumeState.DRAINING),
        volume("d", zone="z4"),
        volume("e", tags=frozenset({"ssd"}), zone="z5", country="us"),
        volume("f", tags=frozenset({"ssd"}), zone="z6"),
        volume("g", tags=frozenset({"ssd"}), zone="z7"),
    ]
    rule = PlacementRule(
        replicas=3,
        required_tags=frozenset({"ssd"}),
        requirements=(LabelRequirement("country", LabelOp.NOT_IN, frozenset({"us"})),),
        excluded_nodes=frozenset({"g"}),
    )
    p = plan(obj(1), rule, NodeMap(vols))
    assert sorted(p.desired) == ["a/v0", "f/v0"]
    verdicts = {r.volume: (r.verdict, r.detail) for r in p.reasons}
    assert verdicts["b/v0"][0] is Verdict.DOWN
    assert verdicts["c/v0"][0] is Verdict.DRAINING
    assert verdicts["d/v0"] == (Verdict.CONSTRAINT, "missing tag ssd")
    assert verdicts["e/v0"] == (Verdict.CONSTRAINT, "needs country not in {us}")
    assert verdicts["g/v0"][0] is Verdict.EXCLUDED
    assert p.degraded and "only 2 of 3" in p.degraded[0]


def test_existing_copies_are_kept_while_allowed() -> None:
    nm = NodeMap(grid(5, 2))
    rule = PlacementRule(replicas=3)
    for i in range(20):
        ideal = plan(obj(i), rule, nm).desired
        # A copy on a volume the ideal did not choose, in a zone the ideal did not use.
        ideal_zones = {nm.get(v).zone for v in ideal}  # type: ignore[union-attr]
        other = next(v.id for v in nm.volumes if v.zone not in ideal_zones)
        p = plan(obj(i), rule, nm, {other})
        assert other in p.desired
        assert p.reason(other).verdict is Verdict.KEPT  # type: ignore[union-attr]
        assert len(set(zones_of(nm, p))) == 3
        # The ideal ignores it when asked to.
        assert plan(obj(i), rule, nm, {other}, keep_current=False).desired == ideal


def test_copies_on_draining_volumes_or_sharing_a_zone_are_not_kept() -> None:
    vols = grid(4, 2)
    vols[0] = volume(vols[0].node, zone=vols[0].zone, state=VolumeState.DRAINING)
    nm = NodeMap(vols)
    rule = PlacementRule(replicas=2)
    same_zone = ["n1-0/v0", "n1-1/v0"]
    p = plan(obj(3), rule, nm, {"n0-0/v0", *same_zone})
    assert "n0-0/v0" not in p.desired
    assert len(set(zones_of(nm, p))) == 2
    kept = [v for v in same_zone if v in p.desired]
    assert len(kept) == 1  # one of the two same-zone copies stays, the other is surplus
    dropped = next(v for v in same_zone if v not in p.desired)
    assert p.reason(dropped).verdict is Verdict.SURPLUS  # type: ignore[union-attr]


def test_surplus_copies_beyond_the_replica_count_are_reported() -> None:
    nm = NodeMap(grid(5, 1))
    everything = {v.id for v in nm.volumes}
    p = plan(obj(1), PlacementRule(replicas=2), nm, everything)
    assert len(p.desired) == 2
    assert sum(r.verdict is Verdict.SURPLUS for r in p.reasons) == 3


def test_full_volumes_are_skipped_but_an_existing_copy_on_one_stays() -> None:
    vols = grid(4, 1)
    vols[0] = volume("n0-0", zone="z0", capacity=10_000, used=9_500)
    nm = NodeMap(vols)
    rule = PlacementRule(replicas=4, load_cap=None)
    p = plan(obj(1, size=1000), rule, nm)
    assert "n0-0/v0" not in p.desired
    assert p.reason("n0-0/v0").verdict is Verdict.FULL  # type: ignore[union-attr]
    assert len(p.desired) == 3 and p.degraded
    p = plan(obj(1, size=1000), rule, nm, {"n0-0/v0"})
    assert "n0-0/v0" in p.desired and not p.degraded


def test_load_cap_skips_a_volume_far_above_its_fair_share() -> None:
    vols = grid(4, 1, capacity=TIB, used=10 * 2**30)
    vols[2] = volume("n2-0", zone="z2", capacity=TIB, used=100 * 2**30)
    nm = NodeMap(vols)
    capped = PlacementRule(replicas=2, load_cap=0.25)
    for i in range(20):
        p = plan(obj(i), capped, nm)
        assert "n2-0/v0" not in p.desired
        assert p.reason("n2-0/v0").verdict is Verdict.OVER_CAP  # type: ignore[union-attr]
    uncapped = PlacementRule(replicas=2, load_cap=None)
    assert any("n2-0/v0" in plan(obj(i), uncapped, nm).desired for i in range(20))


def test_weights_follow_capacity() -> None:
    vols = [volume(f"n{k}", zone=f"z{k}", capacity=TIB * (3 if k == 0 else 1)) for k in range(4)]
    nm = NodeMap(vols)
    rule = PlacementRule(replicas=1, load_cap=None)
    counts = Counter(plan(obj(i), rule, nm).desired[0] for i in range(1200))
    # Expected shares 3/6 and 1/6: 600 and 200.
    assert 520 < counts["n0/v0"] < 680
    for k in range(1, 4):
        assert 150 < counts[f"n{k}/v0"] < 250


def test_soft_preference_multiplies_the_weight() -> None:
    vols = [
        volume(f"n{k}", zone=f"z{k}", tags=frozenset({"ssd"} if k == 0 else ())) for k in range(4)
    ]
    nm = NodeMap(vols)
    rule = PlacementRule(replicas=1, preferences=(Preference(3.0, tag="ssd"),), load_cap=None)
    counts = Counter(plan(obj(i), rule, nm).desired[0] for i in range(1200))
    assert 520 < counts["n0/v0"] < 680  # weight 3 of 6


def test_locality_distance_levels() -> None:
    near = Locality(
        (
            LabelRequirement("region", LabelOp.IN, frozenset({"eu"})),
            LabelRequirement("zone", LabelOp.IN, frozenset({"eu-a"})),
            LabelRequirement("host", LabelOp.IN, frozenset({"web1"})),
        )
    )
    assert near.distance(volume("x", region="eu", zone="eu-a", host="web1")) == 0
    assert near.distance(volume("x", region="eu", zone="eu-a", host="web2")) == 1
    assert near.distance(volume("x", region="eu", zone="eu-b", host="web1")) == 2
    assert near.distance(volume("x", region="us", zone="eu-a", host="web1")) == FAR
    zone_only = Locality((LabelRequirement("zone", LabelOp.IN, frozenset({"eu-a"})),))
    assert zone_only.distance(volume("x", zone="eu-a")) == 0
    assert zone_only.distance(volume("x", zone="eu-b")) == FAR


def test_soft_locality_puts_one_copy_nearest_the_consumer() -> None:
    vols = [
        volume(f"{r}{z}{h}", region=r, zone=f"{r}-{z}", host=f"{r}{z}{h}")
        for r in ("eu", "us")
        for z in ("a", "b", "c")
        for h in (1, 2)
    ]
    nm = NodeMap(vols)
    at_host = Locality(
        (
            LabelRequirement("region", LabelOp.IN, frozenset({"eu"})),
            LabelRequirement("zone", LabelOp.IN, frozenset({"eu-b"})),
            LabelRequirement("host", LabelOp.IN, frozenset({"eub2"})),
        )
    )
    rule = PlacementRule(replicas=3, locality=at_host)
    for i in range(20):
        p = plan(obj(i), rule, nm)
        assert p.desired[0] == "eub2/v0"
        assert p.reason("eub2/v0").verdict is Verdict.LOCAL  # type: ignore[union-attr]
        assert len(set(zones_of(nm, p))) == 3
    # The host is down: the nearest is the other host of its zone.
    vols2 = [v if v.node != "eub2" else volume("eub2", state=VolumeState.DOWN) for v in vols]
    nm2 = NodeMap(vols2)
    for i in range(20):
        assert plan(obj(i), rule, nm2).desired[0] == "eub1/v0"


def test_hard_locality_refuses_to_place_local_copies_elsewhere() -> None:
    nm = NodeMap(grid(3, 2))
    consumer = (LabelRequirement("zone", LabelOp.IN, frozenset({"z9"})),)
    hard = PlacementRule(replicas=3, locality=Locality(consumer, min_local=1, hard=True))
    p = plan(obj(1), hard, nm)
    assert len(p.desired) == 2
    assert any("locality" in d for d in p.degraded)
    soft = PlacementRule(replicas=3, locality=Locality(consumer, min_local=1, hard=False))
    p = plan(obj(1), soft, nm)
    assert len(p.desired) == 3 and not p.degraded


def test_validation_errors_are_placement_errors() -> None:
    with pytest.raises(PlacementError, match="twice"):
        NodeMap([volume("a"), volume("a")])
    with pytest.raises(PlacementError):
        PlacementRule(replicas=0)
    with pytest.raises(PlacementError):
        PlacementRule(replicas=2, min=3)
    with pytest.raises(PlacementError):
        Preference(0.0, tag="ssd")
    with pytest.raises(PlacementError):
        Volume(node="a/b", name="v", capacity=1, free=1)


def test_no_volume_gives_an_empty_degraded_placement() -> None:
    p = plan(obj(1), PlacementRule(replicas=2), NodeMap([]))
    assert p.desired == () and p.degraded


def _assert_batch_matches(rule: PlacementRule, nm: NodeMap, sizes: list[int]) -> None:
    keys = np.array([object_key(obj(i).cid) for i in range(len(sizes))], dtype=np.uint64)
    table = plan_batch(keys, np.array(sizes, dtype=np.int64), rule, nm, batch_rows=97)
    el = Eligibility.of(rule, nm)
    for k, size in enumerate(sizes):
        want = plan_key(int(keys[k]), size, rule, nm, keep_current=False, eligibility=el).desired
        got = tuple(nm.volumes[j].id for j in table[k].tolist() if j != NO_VOLUME)
        assert got == want, k


@pytest.mark.parametrize(
    "rule",
    [
        PlacementRule(replicas=3),
        PlacementRule(replicas=3, spread=SpreadLevel.VOLUME),
        PlacementRule(replicas=4, spread=SpreadLevel.REGION),
        PlacementRule(replicas=3, spread=SpreadLevel.HOST, max_per_domain=2),
        PlacementRule(replicas=2, preferences=(Preference(4.0, label=("zone", "z1")),)),
        PlacementRule(replicas=5, load_cap=0.05),
        PlacementRule(
            replicas=2,
            locality=Locality((LabelRequirement("zone", LabelOp.IN, frozenset({"z2"})),)),
        ),
    ],
)
def test_batch_equals_scalar(rule: PlacementRule) -> None:
    rng = random.Random(11)
    vols = [
        volume(
            f"n{z}-{h}",
            f"v{k}",
            zone=f"z{z}",
            region=f"r{z % 2}",
            capacity=TIB * rng.choice((1, 2, 4)),
            used=rng.randrange(0, 2**38),
        )
        for z in range(6)
        for h in range(2)
        for k in range(2)
    ]
    vols[5] = volume(vols[5].node, vols[5].name, zone="z1", capacity=10**6, used=10**6 - 500)
    sizes = [rng.choice((100, 1000, 10**5)) for _ in range(600)]
    _assert_batch_matches(rule, NodeMap(vols), sizes)


def test_batch_with_too_few_domains_uses_the_scalar_walk() -> None:
    _assert_batch_matches(PlacementRule(replicas=3), NodeMap(grid(2, 2, 2)), [10] * 200)


def test_planner_does_not_import_nats() -> None:
    code = (
        "import sys, cim_place.placement.batch, cim_place.placement.planner; "
        "print(any(m == 'nats' or m.startswith('nats.') for m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_copies_that_fill_the_spread_are_kept_without_a_full_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vols = [volume(f"n{z}{h}", zone=f"z{z}") for z in range(4) for h in range(3)]
    nm = NodeMap(vols)
    rule = PlacementRule(replicas=3, spread=SpreadLevel.ZONE)
    el = Eligibility.of(rule, nm)
    current = {"n01/v0", "n12/v0", "n30/v0"}  # one copy in each of three zones
    full = plan_key(7, 4096, rule, nm, current, eligibility=el)
    assert set(full.desired) == current

    def no_full_walk(walk: object) -> None:
        raise AssertionError("the full walk ran")

    monkeypatch.setattr(planner._Walk, "run", no_full_walk)
    quick = plan_key(7, 4096, rule, nm, current, eligibility=el, explain=False)
    assert quick.desired == full.desired and quick.degraded == ()
    with pytest.raises(AssertionError, match="full walk"):  # two copies in one zone: walks
        plan_key(7, 4096, rule, nm, {"n01/v0", "n02/v0", "n30/v0"}, eligibility=el, explain=False)
