"""RepairSlots: repair tasks in flight per policy against ``repair.max_concurrent`` (pure)."""

from __future__ import annotations

from cim_place.cluster.controller.projection import TaskInFlight
from cim_place.cluster.controller.repairs import RepairSlots
from cim_place.placement.model import PlacementRule
from cim_place.placement.rules import CompiledPolicy

CID = b"\x01\x55\x12\x20" + bytes(32)


def policy(name: str, limit: int) -> CompiledPolicy:
    return CompiledPolicy(
        name=name,
        rule=PlacementRule(replicas=3),
        min_copies=1,
        repair_grace=900.0,
        repair_max_concurrent=limit,
    )


def task(i: int, repair_policy: str | None, kind: str = "repair") -> TaskInFlight:
    return TaskInFlight(f"t{i}", kind, "n1", CID, "v0", 0.0, repair_policy)


def test_only_repairs_of_the_same_policy_count() -> None:
    web, media = policy("web", 2), policy("media", 1)
    slots = RepairSlots(
        [
            task(1, "web"),
            task(2, None, kind="fetch"),  # a first placement: no repair
            task(3, "media", kind="fetch"),  # replacing a lost copy: a repair
            task(4, None, kind="drop"),
        ]
    )
    assert slots.allows(web) and not slots.allows(media)
    slots.take(web)
    assert not slots.allows(web)
    assert slots.allows(policy("other", 1))


def test_a_shard_leader_keeps_to_its_part_of_a_policys_repairs() -> None:
    web = policy("web", 4)
    running = [task(1, "web")]
    assert RepairSlots(running, (1, 2)).allows(web)  # its part: 2 of 4
    assert not RepairSlots([*running, task(2, "web")], (1, 2)).allows(web)
    assert RepairSlots([*running, task(2, "web")], (2, 2)).allows(web)  # every shard: all 4
    assert RepairSlots([], (1, 8)).allows(web)  # never below one
