"""What the reconciler reads about one object and what it returns: inputs, actions, results.

:func:`cim_place.placement.reconciler.reconcile` takes a :class:`ReconcileInput` (the object, its
policy, the node map, confirmed replicas, tasks in flight and failed, the clock) and returns a
:class:`ReconcileResult` (the :data:`Action` list: fetches, drops, repairs; the status; when to
look again). Pure data, no logic beyond :func:`is_repair` and the retry back-off.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cim_place.objectstore.cid import Cid
from cim_place.placement.model import NodeMap, Placement, VolumeId
from cim_place.placement.rules import CompiledPolicy, NodeLiveness
from cim_place.placement.status import ObjectStatus

__all__ = [
    "REPLACING",
    "Action",
    "Drop",
    "FailedTask",
    "Fetch",
    "InFlightTask",
    "ObjectInfo",
    "ReconcileInput",
    "ReconcileResult",
    "Repair",
    "Replica",
    "RetryPolicy",
    "TaskKind",
    "is_repair",
]

Replica = tuple[str, str]
"""A copy's place: ``(node id, volume name)``; its planner volume id is ``node/volume``."""

TaskKind = Literal["fetch", "drop", "verify", "repair"]

REPLACING = "replacing a copy lost with its node"


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectInfo:
    """The object as the controller's projection knows it."""

    cid: Cid
    size: int
    first_seen: float
    """When the first ObjectStored of this CID was seen (expiry counts from here)."""
    owner: str = ""
    name: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class InFlightTask:
    """A task of this CID that was enqueued and has not completed or failed yet."""

    kind: TaskKind
    node: str
    volume: str | None
    task_id: str = ""
    since: float = 0.0
    generation: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedTask:
    """The last failure of a (kind, node, volume) of this CID, with how often it failed."""

    kind: TaskKind
    node: str
    volume: str | None
    generation: int
    failed_at: float
    failures: int = 1
    permanent: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Back-off of failed tasks: ``base * 2**(failures - 1)`` seconds, at most ``maximum``;
    after ``give_up_after`` failures (or one permanent failure) a fetch target is avoided and a
    drop is no longer retried (the status says so)."""

    base: float = 10.0
    maximum: float = 600.0
    give_up_after: int = 5

    def delay(self, failures: int) -> float:
        return float(min(self.base * 2.0 ** max(failures - 1, 0), self.maximum))


@dataclass(frozen=True, slots=True)
class Fetch:
    """Copy the object to ``node``'s ``volume`` from one of ``holders`` (node ids, up first;
    the agent reorders them by nearness)."""

    node: str
    volume: str
    holders: tuple[str, ...]
    generation: int
    reason: str = ""
    repair: bool = False
    """True when the copy replaces one lost with its node: repair work, under the policy's
    ``repair.max_concurrent`` and ``repair.bandwidth`` (see :func:`is_repair`)."""

    @property
    def kind(self) -> Literal["fetch"]:
        return "fetch"


@dataclass(frozen=True, slots=True)
class Drop:
    """Unpin the object from ``node``'s ``volume``."""

    node: str
    volume: str
    generation: int
    reason: str = ""

    @property
    def kind(self) -> Literal["drop"]:
        return "drop"


@dataclass(frozen=True, slots=True)
class Repair:
    """Re-fetch the damaged blocks of the replica on ``node``'s ``volume`` from one of
    ``holders`` (nodes with a verified copy)."""

    node: str
    volume: str
    holders: tuple[str, ...]
    generation: int
    reason: str = ""

    @property
    def kind(self) -> Literal["repair"]:
        return "repair"


Action = Fetch | Drop | Repair


def is_repair(action: Action) -> bool:
    """Whether ``action`` repairs the object: it re-fetches a damaged replica's blocks, or it
    replaces a copy whose node is down past the grace. First placement, moves and drops are
    not repairs."""
    return isinstance(action, Repair) or (isinstance(action, Fetch) and action.repair)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileInput:
    """Everything :func:`reconcile` reads about one object (nothing else: no clock, no I/O).

    ``confirmed``: replicas with an ObjectStored seen and no ObjectRemoved since. ``liveness``: per
    node id; a node missing from it counts as up when the node map has it up or draining, and
    as late otherwise (never acted on: pass departed nodes to ``liveness_from``). ``generation``:
    the base generation of new tasks (pass the stream sequence of the last event applied for
    this CID, so work repeated after a later event gets a fresh task id); a task re-issued after
    a failure gets at least the failed generation + 1.
    """

    obj: ObjectInfo
    policy: CompiledPolicy
    node_map: NodeMap
    confirmed: Collection[Replica]
    liveness: Mapping[str, NodeLiveness]
    now: float
    damaged: Collection[Replica] = ()
    """Confirmed replicas reported damaged (ReplicaDamaged) and not stored again since."""
    verified_at: Mapping[Replica, float] = field(default_factory=dict)
    """When each replica was last known whole (shown in the status)."""
    in_flight: Sequence[InFlightTask] = ()
    failed: Sequence[FailedTask] = ()
    previous: ObjectStatus | None = None
    generation: int = 0
    rebalance: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    explain: bool = False
    """Keep the planner's per-volume reasons in ``ReconcileResult.placement`` (for ``policy
    explain``; costs most of a plan)."""
    removed: str | None = None
    """Set when the object was removed from the domain (``cim-place rm``): who and why, for the
    status. Its desired set is then empty and every copy is dropped, below ``min`` included."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileResult:
    """What to do and what to show. ``desired``: the planner's volumes (empty when expired);
    ``requeue_after``: seconds after which a reconcile may decide differently without any
    event (a grace or a back-off ends, the object expires), or None."""

    actions: tuple[Action, ...]
    status: ObjectStatus
    requeue_after: float | None
    desired: tuple[VolumeId, ...] = ()
    placement: Placement | None = None
    gone: bool = False
    """The object expired and no copy is left to drop: delete its status and stop tracking it."""

    @property
    def fetches(self) -> tuple[Fetch, ...]:
        return tuple(a for a in self.actions if isinstance(a, Fetch))

    @property
    def drops(self) -> tuple[Drop, ...]:
        return tuple(a for a in self.actions if isinstance(a, Drop))

    @property
    def repairs(self) -> tuple[Repair, ...]:
        return tuple(a for a in self.actions if isinstance(a, Repair))
