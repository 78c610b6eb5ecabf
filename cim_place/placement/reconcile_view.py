"""Step 1 of the reconciler: one object's replicas, nodes and tasks, classified once.

A replica is ``pinned`` (node up), ``late`` (node late, or down within the policy's repair grace)
or ``lost`` (down past the grace); a damaged one is no copy. Tasks in flight on lost nodes are
abandoned. See :mod:`cim_place.placement.reconciler` for the steps that read this view.
"""

from __future__ import annotations

from typing import Literal

from cim_place.placement.model import VolumeId, VolumeState
from cim_place.placement.reconcile_model import InFlightTask, ReconcileInput, Replica
from cim_place.placement.rules import Liveness
from cim_place.placement.status import ReplicaState

__all__ = ["NodeClass"]


def _vid(node: str, volume: str) -> VolumeId:
    return f"{node}/{volume}"


def _split(vid: VolumeId) -> Replica:
    node, _, volume = vid.partition("/")
    return node, volume


NodeClass = Literal["up", "late", "lost"]
"""A node as the reconciler treats it: ``late`` covers down within the repair grace."""


class _View:
    """Step 1: replicas, nodes and tasks classified once."""

    def __init__(self, inp: ReconcileInput) -> None:
        self.inp = inp
        self.waits: list[float] = []
        self.notes: list[str] = []
        self._nodes: dict[str, tuple[NodeClass, str, float | None]] = {}
        self.state: dict[VolumeId, ReplicaState] = {}
        self.replica: dict[VolumeId, Replica] = {}
        noted: set[str] = set()
        damaged = set(inp.damaged)
        live_tasks = [t for t in inp.in_flight if self.node(t.node) != "lost"]
        self.repairing = {_task_vid(t) for t in live_tasks if t.kind == "repair"}
        for node, volume in sorted(set(inp.confirmed)):
            vid = _vid(node, volume)
            self.replica[vid] = (node, volume)
            cls = self.node(node)
            self.state[vid] = "pinned" if cls == "up" else cls
            if (node, volume) in damaged and cls != "lost":
                self.state[vid] = "repairing" if vid in self.repairing else "damaged"
            _, note, wait = self._nodes[node]
            if cls == "late" and node not in noted:
                noted.add(node)
                self.notes.append(note)
                if wait is not None:
                    self.waits.append(wait)
        self.fetching = {_task_vid(t) for t in live_tasks if t.kind == "fetch"}
        self.dropping = {_task_vid(t) for t in live_tasks if t.kind == "drop"}
        self.in_flight = live_tasks

    def node(self, node: str) -> NodeClass:
        if node not in self._nodes:
            self._nodes[node] = self._classify(node)
        return self._nodes[node][0]

    def _classify(self, node: str) -> tuple[NodeClass, str, float | None]:
        """The node's class, what the status should say about it, and when that may change."""
        inp = self.inp
        live = inp.liveness.get(node)
        if live is None:
            states = {v.state for v in inp.node_map.volumes if v.node == node}
            if states and VolumeState.DOWN not in states:
                return ("up", "", None)
            return ("late", f"node {node} has no known liveness; its copies are not acted on", None)
        if live.state is Liveness.UP:
            return ("up", "", None)
        if live.state is Liveness.LATE:
            return ("late", f"node {node} is late (no heartbeat since {live.since:.0f})", None)
        grace = inp.policy.repair_grace
        ends = live.since + grace
        if inp.now >= ends:
            return ("lost", f"node {node} is down past the repair grace", None)
        note = (
            f"node {node} is down since {live.since:.0f}; its copies are replaced if it is "
            f"still down at {ends:.0f} (repair grace {grace:.0f}s)"
        )
        return ("late", note, ends - inp.now)

    @property
    def present(self) -> list[VolumeId]:
        """Copies that count: pinned or late (not lost, not damaged)."""
        return [v for v, s in self.state.items() if s in ("pinned", "late")]

    @property
    def damaged(self) -> list[VolumeId]:
        """Replicas reported damaged (repairing ones included), on nodes not lost."""
        return [v for v, s in self.state.items() if s in ("damaged", "repairing")]

    @property
    def pinned(self) -> list[VolumeId]:
        return [v for v, s in self.state.items() if s == "pinned"]


def _task_vid(task: InFlightTask) -> VolumeId:
    return _vid(task.node, task.volume or "")


def _holders(view: _View) -> tuple[str, ...]:
    """Nodes with a present, verified copy: pinned (up) first, then late, then ones being
    dropped. A node whose replica is damaged is no holder."""
    ranked: dict[str, int] = {}
    for vid, state in view.state.items():
        if state not in ("pinned", "late"):
            continue
        node = view.replica[vid][0]
        rank = 2 if vid in view.dropping else (0 if state == "pinned" else 1)
        ranked[node] = min(rank, ranked.get(node, rank))
    return tuple(sorted(ranked, key=lambda n: (ranked[n], n)))
