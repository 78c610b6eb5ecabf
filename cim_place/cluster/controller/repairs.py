"""``repair.max_concurrent``: how many repair tasks each policy has in flight, domain-wide, and
whether the controller may enqueue one more.

A repair (:func:`cim_place.placement.reconciler.is_repair`: a damaged replica re-fetched, or a
copy lost with its node replaced) is recorded in the projection with the policy it counts
against; the controller builds :class:`RepairSlots` from the tasks in flight before it enqueues
an object's tasks, and a repair that does not fit waits (the object is looked at again shortly,
so repairs start as soon as earlier ones complete). First placement, moves and drops are not
counted: they are governed by the controller's own task limits. With shards, each shard leader
counts its own repairs against its part of the limit (``part``; ``config.limit_part``).
"""

from __future__ import annotations

from collections.abc import Iterable

from cim_place.cluster.controller.config import limit_part
from cim_place.cluster.controller.projection import TaskInFlight
from cim_place.placement.rules import CompiledPolicy

__all__ = ["RepairSlots"]


class RepairSlots:
    """Repair tasks in flight per policy name, against each policy's ``repair_max_concurrent``."""

    def __init__(self, in_flight: Iterable[TaskInFlight], part: tuple[int, int] = (1, 1)) -> None:
        self.part = part
        """Shards led and the shard count: this process's part of each policy's limit."""
        self.running: dict[str, int] = {}
        for task in in_flight:
            if task.repair_policy is not None:
                self.running[task.repair_policy] = self.running.get(task.repair_policy, 0) + 1

    def allows(self, policy: CompiledPolicy) -> bool:
        return self.running.get(policy.name, 0) < limit_part(
            policy.repair_max_concurrent, *self.part
        )

    def take(self, policy: CompiledPolicy) -> None:
        self.running[policy.name] = self.running.get(policy.name, 0) + 1
