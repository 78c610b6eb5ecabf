"""Which constraint keeps a rule from placing every copy; the domain-wide warnings; the shipped
default policy's zone behaviour (deploy/policies/default.yaml)."""

from __future__ import annotations

from pathlib import Path

from cim_place.placement.feasibility import unmet
from cim_place.placement.model import (
    NodeMap,
    PlacedObject,
    PlacementRule,
    SpreadLevel,
    Volume,
    VolumeState,
)
from cim_place.placement.planner import plan
from cim_place.placement.rules import compile_policy
from cim_place.placement.topology import topology_warnings
from cim_place.policies.validate import load_paths

TIB = 2**40
DEFAULT = Path(__file__).resolve().parents[2] / "deploy" / "policies" / "default.yaml"


def readme_topology(*, draining: str | None = None) -> NodeMap:
    """``up --leaves 5 --zones 3``: zone-1 leaf-1, leaf-4; zone-2 leaf-2, leaf-5; zone-3 leaf-3."""
    return NodeMap(
        Volume(
            node=f"leaf-{i}",
            name="v0",
            capacity=TIB,
            free=TIB,
            labels={"zone": f"zone-{(i - 1) % 3 + 1}"},
            state=VolumeState.DRAINING if f"leaf-{i}" == draining else VolumeState.UP,
        )
        for i in range(1, 6)
    )


def obj(i: int) -> PlacedObject:
    return PlacedObject(cid=b"\x01\x55\x12\x20" + i.to_bytes(32, "big"), size=1024)


def test_the_shipped_default_keeps_three_copies_when_a_zone_is_drained() -> None:
    loaded = load_paths([str(DEFAULT)])
    policy = compile_policy(loaded.policy_set.policies[0])
    nm = readme_topology()
    for i in range(50):
        desired = plan(obj(i), policy.rule, nm).desired
        assert sorted(nm.get(v).zone for v in desired) == ["zone-1", "zone-2", "zone-3"]  # type: ignore[union-attr]
    drained = readme_topology(draining="leaf-3")
    for i in range(50):
        p = plan(obj(i), policy.rule, drained)
        assert len(p.desired) == 3 and not p.degraded
        hosts = {drained.get(v).host for v in p.desired}  # type: ignore[union-attr]
        assert len(hosts) == 3 and "leaf-3" not in hosts
    assert topology_warnings([policy], drained) == []


def test_a_hard_zone_cap_names_the_spread_constraint_in_status_and_warning() -> None:
    rule = PlacementRule(replicas=3, max_per_domain=1, cap_level=SpreadLevel.ZONE)
    drained = readme_topology(draining="leaf-3")
    p = plan(obj(1), rule, drained)
    assert len(p.desired) == 2
    assert any("spread: 3 copies desired, at most 1 per zone" in m for m in p.degraded), p.degraded
    policy = compile_policy(load_paths([str(DEFAULT)]).policy_set.policies[0])
    from dataclasses import replace

    hard = replace(policy, name="hard", rule=rule)
    (warning,) = topology_warnings([hard, policy], drained)
    assert warning.startswith("policy hard: only 2 of 3 copies can be placed (spread:")
    assert "(zone-1, zone-2)" in warning


def test_unmet_names_constraints_then_capacity_then_locality() -> None:
    nm = readme_topology()
    vols = list(nm.volumes)
    assert unmet(PlacementRule(replicas=6), vols) is not None
    assert unmet(PlacementRule(replicas=6), vols).constraint == "constraints"  # type: ignore[union-attr]
    full = [True, True, True, False, False]
    why = unmet(PlacementRule(replicas=3), vols, full=full, size=10)
    assert why is not None and why.constraint == "capacity" and why.placeable == 2
    assert unmet(PlacementRule(replicas=3), vols) is None
