"""The controller's task budget is reused until a task starts or ends elsewhere (no server)."""

from __future__ import annotations

import hashlib

from cim_place.cluster.controller.service import Controller, ControllerConfig
from cim_place.cluster.tasks.model import Task
from cim_place.objectstore.cid import RAW, cid_of_digest


def task(i: int, node: str = "n1") -> Task:
    root = cid_of_digest(RAW, hashlib.sha256(str(i).encode()).digest())
    return Task.create("drop", node, root, generation=i, volume="v0")


def test_the_budget_is_recomputed_only_when_tasks_change() -> None:
    controller = Controller(ControllerConfig(max_tasks_per_node=2))
    first = controller._budget()
    assert controller._budget() is first  # nothing changed: no new walk
    assert first.allows("n1", "drop", 0)
    controller.projection.task_enqueued(task(1), 0.0)  # a task started elsewhere (demand copies)
    second = controller._budget()
    assert second is not first and second.tasks == {"n1": 1}
    controller.projection.task_enqueued(task(2), 0.0)
    assert not controller._budget().allows("n1", "drop", 0)  # two in flight on n1
    assert controller.projection.expire_tasks(older_than=1.0)  # both end
    assert controller._budget().allows("n1", "drop", 0)
