"""The reconciler: for one object, which tasks to issue and what its status is. A pure function.

The controller re-reads the world for a CID (its confirmed replicas, the tasks in flight, the node
map, node liveness, the clock) and calls :func:`reconcile`; it enqueues the returned actions as
tasks (``Task.create(kind, node, cid, generation=..., volume=..., holders=...)``), writes the
status, and looks again after ``requeue_after`` seconds if that is set. Level-triggered: running it
again with the tasks it asked for in flight asks for nothing new.

Steps of :func:`reconcile`:

1. Classify each confirmed replica by its node's liveness: ``pinned`` (node up), ``late`` (node
   late, or down for less than the policy's repair grace: not acted on, counts as present),
   ``lost`` (down past the grace). A replica reported damaged (``damaged``; ``repairing`` with a
   repair in flight) is no copy: it never counts, is never a holder, and is never dropped for
   being surplus, but the planner keeps its volume (it is repaired in place). Tasks in flight on
   lost nodes are abandoned: they neither block drops nor count as progress (they may still
   finish if the node returns; a copy made that way is surplus and trimmed later).
2. A removed object (``removed``: an operator's ``cim-place rm``, a tombstone event) and an
   expired one (``now - first_seen > expire_after``) get a drop for every copy that is not lost
   (a copy a fetch is still targeting waits for it), and nothing else. These are the only ways
   the last copy is ever dropped: the minimum of step 5 protects content from the controller's
   own decisions, not from an explicit removal. An expired object's state is ``expired``
   (desired 0: never lost nor under-replicated); once no copy is left and nothing is in flight,
   ``gone`` tells the controller to delete its status and stop tracking it.
3. Plan: the planner gets the node map with lost nodes down and, on late nodes, only the volumes
   holding a present copy or targeted by a fetch in flight left up (kept, never new targets).
   ``current`` is the present copies not being dropped plus the fetch targets in flight, so a
   re-plan while work is under way keeps choosing the same volumes.
4. Fetch for every desired volume without a present copy, unless a fetch or drop is in flight
   there, or a failed fetch there is still backing off (retried with ``generation + 1`` after
   :class:`RetryPolicy` back-off; after ``give_up_after`` failures, or a permanent one, the volume
   is no longer offered to the planner). Holders: nodes with a present copy, up ones first.
   While a copy is lost (its node down past the grace) these fetches are repairs
   (:func:`is_repair`), like step 5b's: the controller keeps at most the policy's
   ``repair.max_concurrent`` of them in flight and gives them its ``repair.bandwidth``.
5. Drop surplus copies (present, not desired) only when every desired volume holds a pinned copy
   and no fetch is in flight (copy before drop; a move is copy-then-drop), one drop per copy,
   draining volumes first, and only while at least ``max(min, 1)`` pinned copies on up nodes
   remain after every drop in flight and issued. Late and lost copies are never dropped.
5b. Repair every damaged replica on an up node at once (no grace: the node is up, its copy is
   bad) from the verified holders; with no verified holder none is issued (the object is
   ``lost``) and nothing is dropped.
6. Rebalance (``rebalance=True``, for objects the controller picked with
   :func:`rebalance_candidates`): when the object is placed and quiet, fetch the volumes of its
   balanced ideal (``keep_current=False``) that it lacks; once confirmed, step 5 drops the copies
   the planner no longer prefers.
7. Status: ``removed`` or ``expired`` (step 2), ``lost`` when no verified copy is present
   anywhere, ``degraded`` while a damaged replica leaves fewer verified copies than desired,
   ``placed`` when every desired volume holds a pinned copy and the planner found all desired
   replicas, ``progressing`` when tasks are in flight or issued, ``degraded`` otherwise (with the
   planner's reason, the grace or the back-off being waited for). Conditions ``Placed``,
   ``Progressing``, ``Degraded`` are merged with the previous status so ``last_transition``
   moves only when a condition flips.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from cim_place.objectstore import cid as cids
from cim_place.objectstore.cid import Cid
from cim_place.placement.model import (
    NodeMap,
    PlacedObject,
    Placement,
    PlacementRule,
    Volume,
    VolumeId,
    VolumeState,
)
from cim_place.placement.planner import Eligibility, plan
from cim_place.placement.rules import CompiledPolicy, Liveness, NodeLiveness
from cim_place.placement.status import (
    Condition,
    Location,
    ObjectState,
    ObjectStatus,
    ReplicaState,
    merge_conditions,
)

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
    "is_repair",
    "rebalance_candidates",
    "reconcile",
]

Replica = tuple[str, str]
"""A copy's place: ``(node id, volume name)``; its planner volume id is ``node/volume``."""

TaskKind = Literal["fetch", "drop", "verify", "repair"]

REPLACING = "replacing a copy lost with its node"


def _vid(node: str, volume: str) -> VolumeId:
    return f"{node}/{volume}"


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


def reconcile(inp: ReconcileInput) -> ReconcileResult:
    """Decide the tasks and the status of one object (steps: module docstring)."""
    view = _View(inp)
    policy = inp.policy
    rule = policy.rule
    expire_after = policy.expire_after
    if inp.removed is not None:
        return _drop_every_copy(inp, view, "removed from the domain", removed=inp.removed)
    if expire_after is not None and inp.now - inp.obj.first_seen > expire_after:
        return _drop_every_copy(inp, view, f"expired after {expire_after:.0f}s")
    waits = list(view.waits)
    if expire_after is not None:
        waits.append(inp.obj.first_seen + expire_after - inp.now)
    failures = {(f.kind, _vid(f.node, f.volume or "")): f for f in inp.failed}
    avoided = {
        vid
        for (kind, vid), f in failures.items()
        if kind == "fetch" and (f.permanent or f.failures >= inp.retry.give_up_after)
    }
    present = set(view.present)
    # A damaged replica is repaired where it is: the planner keeps its volume like a copy's.
    held = present | set(view.damaged)
    current = (held - view.dropping) | (view.fetching - view.dropping)
    node_map = _planning_map(inp, view, held | view.fetching, avoided - held)
    el = _eligibility(rule, node_map)
    placement = plan(
        PlacedObject(inp.obj.cid, inp.obj.size),
        rule,
        node_map,
        current,
        eligibility=el,
        explain=inp.explain,
    )
    desired = placement.desired
    actions: list[Action] = []
    blocked: list[str] = []
    holders = _holders(view)

    # Step 4: fetch what is missing (a repair when a copy was lost with its node).
    replacing = "lost" in view.state.values()
    for vid in desired:
        if vid in held or vid in view.fetching:
            continue
        if vid in view.dropping:
            continue  # the drop must finish first, or it would remove the new copy
        if not holders:
            break
        node, volume = _split(vid)
        failed = failures.get(("fetch", vid))
        generation = _generation(inp, failed)
        if failed is not None:
            wait = failed.failed_at + inp.retry.delay(failed.failures) - inp.now
            if wait > 0:
                waits.append(wait)
                blocked.append(
                    f"fetch to {vid} failed {failed.failures}x ({failed.reason or 'no reason'}); "
                    f"retrying in {wait:.0f}s"
                )
                continue
        if replacing:
            actions.append(Fetch(node, volume, holders, generation, REPLACING, repair=True))
        else:
            actions.append(Fetch(node, volume, holders, generation, "missing desired copy"))

    # Step 5: drop surplus, copy before drop, never below the floor.
    desired_set = set(desired)
    pinned = set(view.pinned)
    all_pinned = all(v in pinned and v not in view.dropping for v in desired)
    fetch_in_flight = bool(view.fetching) or any(isinstance(a, Fetch) for a in actions)
    surplus = [v for v in view.pinned if v not in desired_set and v not in view.dropping]
    if surplus and all_pinned and not fetch_in_flight:
        floor = max(policy.min_copies, 1)
        remaining = len(pinned - view.dropping)
        surplus.sort(key=lambda v: (not _draining(inp.node_map, v), v))
        for vid in surplus:
            if remaining - 1 < floor:
                blocked.append(
                    f"surplus copy on {vid} kept: dropping it would leave fewer than {floor} "
                    "pinned copies on up nodes"
                )
                break
            failed = failures.get(("drop", vid))
            if failed is not None:
                if failed.permanent or failed.failures >= inp.retry.give_up_after:
                    blocked.append(f"drop on {vid} failed {failed.failures}x; not retried")
                    continue
                wait = failed.failed_at + inp.retry.delay(failed.failures) - inp.now
                if wait > 0:
                    waits.append(wait)
                    continue
            node, volume = _split(vid)
            reason = "volume draining" if _draining(inp.node_map, vid) else "surplus copy"
            actions.append(Drop(node, volume, _generation(inp, failed), reason))
            remaining -= 1

    # Step 5b: repair damaged replicas in place, from verified holders only.
    for vid in view.damaged:
        if vid in view.repairing or view.node(view.replica[vid][0]) != "up":
            continue
        if not holders:
            blocked.append(f"damaged copy on {vid} cannot be repaired: no verified copy anywhere")
            continue
        failed = failures.get(("repair", vid))
        if failed is not None:
            wait = failed.failed_at + inp.retry.delay(failed.failures) - inp.now
            if wait > 0:
                waits.append(wait)
                blocked.append(
                    f"repair of {vid} failed {failed.failures}x; retrying in {wait:.0f}s"
                )
                continue
        node, volume = _split(vid)
        repair_holders = tuple(h for h in holders if h != node)
        if not repair_holders:
            blocked.append(f"damaged copy on {vid}: its node holds the only verified copy")
            continue
        actions.append(
            Repair(node, volume, repair_holders, _generation(inp, failed), "damaged copy")
        )

    # Step 6: rebalance towards the balanced ideal, copy first.
    placed = len(desired) == rule.replicas and all_pinned
    if (
        inp.rebalance
        and placed
        and not actions
        and not view.in_flight
        and holders
        and not view.damaged
    ):
        placed_obj = PlacedObject(inp.obj.cid, inp.obj.size)
        ideal = plan(placed_obj, rule, node_map, keep_current=False, eligibility=el, explain=False)
        missing = [v for v in ideal.desired if v not in present]
        if missing and not set(missing) & avoided and _settles(ideal, current, el, placed_obj):
            for vid in missing:
                node, volume = _split(vid)
                generation = _generation(inp, failures.get(("fetch", vid)))
                actions.append(Fetch(node, volume, holders, generation, "rebalance"))

    status = _status(inp, view, placement, actions, blocked, expired=False)
    return ReconcileResult(
        actions=tuple(actions),
        status=status,
        requeue_after=_requeue(waits),
        desired=desired,
        placement=placement,
    )


def rebalance_candidates(
    objects: Iterable[tuple[PlacedObject, Collection[VolumeId]]],
    rule: PlacementRule,
    node_map: NodeMap,
    *,
    limit: int,
) -> list[PlacedObject]:
    """Up to ``limit`` objects whose balanced ideal differs from what the planner keeps for
    them (``current``: their confirmed volumes), in input order.

    The controller calls this after a volume joins (one rule at a time: group objects by
    policy), and reconciles each candidate with ``rebalance=True``; ``limit`` is its rate limit.
    Objects whose ideal cannot be fully placed are skipped (repair, not rebalance, is their need).
    """
    out: list[PlacedObject] = []
    if limit <= 0:
        return out
    el = Eligibility.of(rule, node_map)
    for obj, current in objects:
        ideal = plan(obj, rule, node_map, keep_current=False, eligibility=el, explain=False)
        if len(ideal.desired) != rule.replicas:
            continue
        kept = plan(obj, rule, node_map, current, eligibility=el, explain=False)
        if set(kept.desired) != set(ideal.desired) and _settles(ideal, current, el, obj):
            out.append(obj)
            if len(out) >= limit:
                break
    return out


def _settles(
    ideal: Placement, current: Collection[VolumeId], el: Eligibility, obj: PlacedObject
) -> bool:
    """Whether, once the ideal's missing copies exist, the planner (keeping current copies)
    would keep exactly the ideal ones. Not always: a kept copy is exempt from the load cap that
    the ideal respects. A move that would be undone is not started."""
    rule = el.rule
    if len(ideal.desired) != rule.replicas:
        return False
    after = set(current) | set(ideal.desired)
    kept = plan(obj, rule, el.node_map, after, eligibility=el, explain=False)
    return set(kept.desired) == set(ideal.desired)


def _drop_every_copy(
    inp: ReconcileInput, view: _View, reason: str, *, removed: str | None = None
) -> ReconcileResult:
    """Step 2: a drop for every copy not lost and not already being dropped or fetched."""
    actions: list[Action] = []
    for vid in [*view.present, *view.damaged]:
        if vid in view.dropping or vid in view.fetching:
            continue  # a fetch there must finish first, or it would pin the copy again
        node, volume = _split(vid)
        failed = next(
            (f for f in inp.failed if f.kind == "drop" and _vid(f.node, f.volume or "") == vid),
            None,
        )
        actions.append(Drop(node, volume, _generation(inp, failed), reason))
    status = _status(inp, view, None, actions, [], expired=removed is None, removed=removed)
    gone = removed is None and not actions and not view.present and not view.in_flight
    return ReconcileResult(actions=tuple(actions), status=status, requeue_after=None, gone=gone)


def _planning_map(
    inp: ReconcileInput,
    view: _View,
    keep: set[VolumeId],
    avoided: set[VolumeId],
) -> NodeMap:
    """The node map as the planner should see it for this object (step 3).

    Usually the controller's map itself. Otherwise the adjusted map is cached by its
    adjustments, so the objects sharing one late node also share one map and its eligibility.
    """
    base = inp.node_map
    unusual = {n for n, live in inp.liveness.items() if live.state is not Liveness.UP}
    changes: dict[VolumeId, VolumeState] = {}
    for volume in base.volumes:
        if volume.node not in unusual and volume.node in inp.liveness and volume.id not in avoided:
            continue
        state = volume.state
        cls = view.node(volume.node)
        if cls == "lost":
            state = VolumeState.DOWN
        elif cls == "late":
            # Not acted on: what it holds (or is fetching) is kept, it is no new target.
            if volume.id not in keep:
                state = VolumeState.DOWN
            elif state is VolumeState.DOWN:
                state = VolumeState.UP
        if volume.id in avoided:
            state = VolumeState.DOWN
        if state is not volume.state:
            changes[volume.id] = state
    # Copies on volumes the node map does not know (a node that went away, a volume no longer
    # reported): a stand-in so the planner can keep them, in the node's failure domain if known.
    standins = {
        vid: VolumeState.DOWN if view.node(_split(vid)[0]) == "lost" else VolumeState.UP
        for vid in keep
        if vid not in base
    }
    if not changes and not standins:
        return base
    key = (id(base), frozenset(changes.items()), frozenset(standins.items()))
    cached = _MAP_CACHE.get(key)
    if cached is not None and cached[0] is base:
        return cached[1]
    volumes = [replace(v, state=changes[v.id]) if v.id in changes else v for v in base.volumes]
    for vid, state in sorted(standins.items()):
        node, name = _split(vid)
        labels = next((v.labels for v in base.volumes if v.node == node), {})
        volumes.append(
            Volume(node=node, name=name, capacity=0, free=0, labels=labels, weight=1.0, state=state)
        )
    node_map = NodeMap(volumes)
    if len(_MAP_CACHE) >= _CACHE_SIZE:
        _MAP_CACHE.pop(next(iter(_MAP_CACHE)))
    _MAP_CACHE[key] = (base, node_map)
    return node_map


_CACHE_SIZE = 16
_MapKey = tuple[
    int, frozenset[tuple[VolumeId, VolumeState]], frozenset[tuple[VolumeId, VolumeState]]
]
_MAP_CACHE: dict[_MapKey, tuple[NodeMap, NodeMap]] = {}
"""Adjusted planning maps by (base map id, adjustments); each entry keeps its base map alive,
so the id cannot be reused by another map while the entry exists."""
_ELIGIBILITY_CACHE: dict[tuple[int, PlacementRule], tuple[NodeMap, Eligibility]] = {}


def _eligibility(rule: PlacementRule, node_map: NodeMap) -> Eligibility:
    """What ``rule`` leaves of ``node_map``, computed once per (rule, map) and reused: most
    reconciles of a pass plan against the same map and a handful of rules. The entry keeps its
    map alive, so the ``id`` in the key cannot be reused by another map while cached."""
    key = (id(node_map), rule)
    entry = _ELIGIBILITY_CACHE.get(key)
    if entry is not None and entry[0] is node_map:
        return entry[1]
    el = Eligibility.of(rule, node_map)
    if len(_ELIGIBILITY_CACHE) >= _CACHE_SIZE:
        _ELIGIBILITY_CACHE.pop(next(iter(_ELIGIBILITY_CACHE)))
    _ELIGIBILITY_CACHE[key] = (node_map, el)
    return el


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


def _generation(inp: ReconcileInput, failed: FailedTask | None) -> int:
    if failed is None:
        return inp.generation
    return max(inp.generation, failed.generation + 1)


def _draining(node_map: NodeMap, vid: VolumeId) -> bool:
    volume = node_map.get(vid)
    return volume is not None and volume.state is VolumeState.DRAINING


def _split(vid: VolumeId) -> Replica:
    node, _, volume = vid.partition("/")
    return node, volume


def _requeue(waits: Iterable[float]) -> float | None:
    positive = [w for w in waits if w > 0]
    return min(positive) if positive else None


def _status(
    inp: ReconcileInput,
    view: _View,
    placement: Placement | None,
    actions: Sequence[Action],
    blocked: Sequence[str],
    *,
    expired: bool,
    removed: str | None = None,
) -> ObjectStatus:
    """Step 7."""
    rule = inp.policy.rule
    locations: list[Location] = []
    for vid, replica_state in view.state.items():
        node, volume = view.replica[vid]
        shown: ReplicaState = (
            "dropping" if vid in view.dropping and replica_state != "lost" else replica_state
        )
        verified = inp.verified_at.get((node, volume))
        locations.append(Location(node, volume, _zone(inp.node_map, vid), shown, verified))
    for vid in sorted(view.fetching - set(view.state)):
        node, volume = _split(vid)
        locations.append(Location(node, volume, _zone(inp.node_map, vid), "fetching"))
    fetches = sum(1 for t in view.in_flight if t.kind == "fetch") + sum(
        1 for a in actions if isinstance(a, Fetch)
    )
    drops = sum(1 for t in view.in_flight if t.kind == "drop") + sum(
        1 for a in actions if isinstance(a, Drop)
    )
    repairs = sum(1 for t in view.in_flight if t.kind == "repair") + sum(
        1 for a in actions if isinstance(a, Repair)
    )
    moving = fetches + drops + repairs > 0
    damaged = view.damaged
    present = view.present
    desired = placement.desired if placement is not None else ()
    pinned = set(view.pinned) - view.dropping
    state: ObjectState
    if removed is not None:
        state = "removed"
        reason = "Removed"
        message = f"{removed}; " + (
            f"dropping {len(present)} copies" if present else "every copy dropped"
        )
        degraded = (False, "Removed", message)
    elif expired:
        state = "expired"
        reason = "Expired"
        message = (
            f"expired: first seen at {inp.obj.first_seen:.0f}, policy {inp.policy.name} keeps "
            f"content {inp.policy.expire_after:.0f}s; "
            + (f"dropping {len(present)} copies" if present else "every copy dropped")
        )
        degraded = (False, "Expired", message)
    elif not present:
        state = "lost"
        lost = [v for v, s in view.state.items() if s == "lost"]
        reason = "AllDamaged" if damaged else "NoCopy"
        message = "no verified copy anywhere" + (
            f"; copies on {', '.join(lost)} are on nodes down past the repair grace" if lost else ""
        )
        if damaged:
            message += (
                f"; every remaining copy is damaged ({', '.join(sorted(damaged))}): nothing to "
                "repair from; restore the content (docs/DURABILITY.md)"
            )
        degraded = (True, "Lost", message)
    else:
        complete = placement is not None and len(desired) == rule.replicas
        if complete and all(v in pinned for v in desired):
            state = "placed"
            reason, message = "DesiredMet", f"{len(desired)} of {rule.replicas} copies pinned"
            if blocked:
                message += "; " + "; ".join(blocked)
            degraded = (False, "DesiredMet", message)
        else:
            # Fewer verified copies than desired because of damage is degraded, repair or not.
            state = "progressing" if moving and not damaged else "degraded"
            have = sum(1 for v in desired if v in pinned)
            reason = "BelowDesired"
            message = f"{have} of {rule.replicas} desired copies pinned"
            causes: list[tuple[str, str]] = []
            if damaged:
                causes.append(("Damaged", f"damaged: {', '.join(sorted(damaged))}"))
            if placement is not None and placement.degraded:
                causes.append(("Unsatisfiable", "; ".join(placement.degraded)))
            if blocked:
                causes.append(("BackOff", "; ".join(blocked)))
            if view.notes:
                causes.append(("WaitingForGrace", "; ".join(view.notes)))
            if causes:
                message = f"{message}: " + "; ".join(c[1] for c in causes)
            degraded = (state == "degraded", causes[0][0] if causes else "BelowDesired", message)
    conditions = [
        Condition("Placed", state == "placed", reason, message),
        Condition(
            "Progressing",
            moving,
            "TasksInFlight" if moving else "Idle",
            f"{fetches} fetches, {drops} drops, {repairs} repairs in flight or issued",
        ),
        Condition("Degraded", degraded[0], degraded[1], degraded[2]),
    ]
    previous = inp.previous.conditions if inp.previous is not None else ()
    obj = inp.obj
    status = ObjectStatus(
        cid=cids.to_str(obj.cid),
        state=state,
        locations=tuple(locations),
        desired=0 if expired else rule.replicas,
        policy=inp.policy.name,
        name=obj.name,
        owner=obj.owner,
        size=obj.size,
        metadata=dict(obj.metadata),
        conditions=merge_conditions(previous, conditions, inp.now),
        updated_at=inp.now,
    )
    # An unchanged status keeps its time, so the locations store can skip rewriting it.
    if inp.previous is not None and replace(status, updated_at=inp.previous.updated_at) == (
        inp.previous
    ):
        return inp.previous
    return status


def _zone(node_map: NodeMap, vid: VolumeId) -> str:
    volume = node_map.get(vid)
    return volume.zone if volume is not None else ""
