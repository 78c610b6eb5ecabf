"""Placement converges when there is room: objects placed one after another, the load of each
placement fed back into the next node map, as the controller sees it.

Every object gets its desired copies, at most one per zone while there are at least as many
zones as copies, whatever the topology and the mix of object sizes; the load cap's fair share
follows the spread (placement/shares.py).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim_place.placement.model import (
    NodeMap,
    PlacedObject,
    PlacementRule,
    SpreadLevel,
    Verdict,
    Volume,
)
from cim_place.placement.planner import plan
from cim_place.placement.shares import expected_copies, water_fill

TIB = 2**40
KIB = 1024
MIB = 2**20
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def obj(i: int, size: int) -> PlacedObject:
    return PlacedObject(cid=b"\x01\x55\x12\x20" + i.to_bytes(32, "big"), size=size)


def layout(zones: list[list[int]]) -> list[tuple[str, str, int]]:
    """(node, zone, capacity weight) for ``zones``: per zone, the capacity units of its nodes."""
    return [
        (f"n{z}-{h}", f"z{z}", units)
        for z, nodes in enumerate(zones)
        for h, units in enumerate(nodes)
    ]


def node_map(nodes: list[tuple[str, str, int]], used: dict[str, int]) -> NodeMap:
    return NodeMap(
        Volume(
            node=node,
            name="v0",
            capacity=units * TIB,
            free=units * TIB - used.get(f"{node}/v0", 0),
            labels={"zone": zone},
        )
        for node, zone, units in nodes
    )


def place_all(
    nodes: list[tuple[str, str, int]], rule: PlacementRule, sizes: list[int], seed: int
) -> list[tuple[tuple[str, ...], NodeMap]]:
    """Place objects in order as the controller would: each is stored first on a random
    node (the upload), the planner keeps that copy when the rule allows it, the surplus is
    dropped, and the next plan sees the new used bytes."""
    rnd = random.Random(seed)
    used: dict[str, int] = {}
    out = []
    for i, size in enumerate(sizes):
        nm = node_map(nodes, used)
        ingest = f"{rnd.choice(nodes)[0]}/v0"
        placement = plan(obj(i, size), rule, nm, {ingest}, explain=False)
        for vid in placement.desired:
            used[vid] = used.get(vid, 0) + size
        out.append((placement.desired, nm))
    return out


sizes_strategy = st.lists(
    st.one_of(st.integers(KIB, 64 * KIB), st.integers(MIB, 6 * MIB)), min_size=20, max_size=60
)


@SETTINGS
@given(
    zones=st.lists(
        st.lists(st.sampled_from((1, 1, 2, 4)), min_size=1, max_size=3), min_size=1, max_size=5
    ),
    replicas=st.integers(1, 4),
    hard_zone_cap=st.booleans(),
    sizes=sizes_strategy,
    seed=st.integers(0, 2**16),
)
def test_every_object_gets_its_copies_one_per_zone_when_zones_suffice(
    zones: list[list[int]], replicas: int, hard_zone_cap: bool, sizes: list[int], seed: int
) -> None:
    nodes = layout(zones)
    rule = PlacementRule(
        replicas=replicas,
        max_per_domain=1 if hard_zone_cap else None,
        cap_level=SpreadLevel.ZONE if hard_zone_cap else None,
        load_cap=0.25,
    )
    enough_zones = len(zones) >= replicas
    can_hold = len(zones) if hard_zone_cap else len(nodes)
    for desired, nm in place_all(nodes, rule, sizes, seed):
        assert len(desired) == min(replicas, can_hold)
        zones_used = [nm.get(v).zone for v in desired]  # type: ignore[union-attr]
        if enough_zones:
            assert len(set(zones_used)) == len(zones_used), desired
        else:
            # Too few zones: every zone is used before any doubles up.
            assert len(set(zones_used)) == min(len(zones), len(desired))


def test_the_readme_topology_places_every_object_one_copy_per_zone() -> None:
    """``up --leaves 5 --zones 3``: zone-3 has one node, which holds a copy of every object;
    its fair share says so, so the load cap never turns it down."""
    nodes = [(f"leaf-{i}", f"zone-{(i - 1) % 3 + 1}", 1) for i in range(1, 6)]
    rule = PlacementRule(replicas=3, max_per_domain=1, cap_level=SpreadLevel.ZONE)
    rnd = random.Random(15)
    sizes = [rnd.choice((KIB, 200 * KIB, 3 * MIB, 5 * MIB)) for _ in range(200)]
    for desired, nm in place_all(nodes, rule, sizes, seed=1):
        assert len(desired) == 3
        assert sorted(nm.get(v).zone for v in desired) == ["zone-1", "zone-2", "zone-3"]  # type: ignore[union-attr]
        assert "leaf-3/v0" in desired


def test_the_single_node_zone_is_never_over_its_cap() -> None:
    nodes = [(f"leaf-{i}", f"zone-{(i - 1) % 3 + 1}", 1) for i in range(1, 6)]
    rule = PlacementRule(replicas=3, max_per_domain=1, cap_level=SpreadLevel.ZONE)
    # leaf-3 holds a copy of each of 100 objects of 1 MiB; the others half each.
    used = {"leaf-3/v0": 100 * MIB} | {f"leaf-{i}/v0": 50 * MIB for i in (1, 2, 4, 5)}
    nm = node_map(nodes, used)
    p = plan(obj(1, KIB), rule, nm)
    assert p.reason("leaf-3/v0").verdict is not Verdict.OVER_CAP  # type: ignore[union-attr]
    assert "leaf-3/v0" in p.desired


def test_an_over_cap_volume_still_takes_the_copy_its_zone_needs() -> None:
    """The cap balances; it never costs a copy: far above its share, the only volume of a zone
    still gets the zone's copy rather than a second zone doubling up."""
    nodes = [(f"leaf-{i}", f"zone-{(i - 1) % 3 + 1}", 1) for i in range(1, 6)]
    rule = PlacementRule(replicas=3, load_cap=0.25)
    nm = node_map(nodes, {"leaf-3/v0": 500 * MIB})
    p = plan(obj(1, KIB), rule, nm)
    assert sorted(nm.get(v).zone for v in p.desired) == ["zone-1", "zone-2", "zone-3"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("replicas", "cap", "want"),
    [
        (3, True, [0.5, 0.5, 1.0, 0.5, 0.5]),
        (3, False, [0.5, 0.5, 1.0, 0.5, 0.5]),
        (4, False, [0.75, 0.75, 1.0, 0.75, 0.75]),
        (4, True, [0.5, 0.5, 1.0, 0.5, 0.5]),
        (1, True, [0.2, 0.2, 0.2, 0.2, 0.2]),
        (5, False, [1.0] * 5),
    ],
)
def test_expected_copies_follow_the_spread(replicas: int, cap: bool, want: list[float]) -> None:
    nodes = [(f"leaf-{i}", f"zone-{(i - 1) % 3 + 1}", 1) for i in range(1, 6)]
    nm = node_map(nodes, {})
    rule = PlacementRule(
        replicas=replicas,
        max_per_domain=1 if cap else None,
        cap_level=SpreadLevel.ZONE if cap else None,
    )
    # node order leaf-1..leaf-5 is id order in the map
    assert expected_copies(rule, nm.volumes).tolist() == pytest.approx(want)


def test_water_fill_gives_what_a_capped_item_cannot_take_to_the_others() -> None:
    assert water_fill([1, 1, 4], [1, 1, 1], 2) == pytest.approx([0.5, 0.5, 1.0])
    assert water_fill([1, 1, 1], [1, 1, 1], 5) == [1.0, 1.0, 1.0]
    assert water_fill([2, 1, 1], [5, 5, 5], 2) == pytest.approx([1.0, 0.5, 0.5])
    assert water_fill([0, 1], [1, 1], 1) == pytest.approx([0.0, 1.0])
