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

from collections.abc import Collection, Iterable
from dataclasses import replace

from cim_place.placement.eligibility import Eligibility
from cim_place.placement.model import (
    NodeMap,
    PlacedObject,
    Placement,
    PlacementRule,
    Volume,
    VolumeId,
    VolumeState,
)
from cim_place.placement.planner import plan
from cim_place.placement.reconcile_model import (
    REPLACING,
    Action,
    Drop,
    FailedTask,
    Fetch,
    ReconcileInput,
    ReconcileResult,
    Repair,
)
from cim_place.placement.reconcile_status import _status
from cim_place.placement.reconcile_view import _holders, _split, _vid, _View
from cim_place.placement.rules import Liveness

__all__ = ["rebalance_candidates", "reconcile"]


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
    eligibility: Eligibility | None = None,
) -> list[PlacedObject]:
    """Up to ``limit`` objects whose balanced ideal differs from what the planner keeps for
    them (``current``: their confirmed volumes), in input order. ``eligibility``: the rule's on
    ``node_map``, when the caller keeps it across calls.

    The controller calls this after a volume joins (one rule at a time: group objects by
    policy), and reconciles each candidate with ``rebalance=True``; ``limit`` is its rate limit.
    Objects whose ideal cannot be fully placed are skipped (repair, not rebalance, is their need).
    """
    out: list[PlacedObject] = []
    if limit <= 0:
        return out
    el = eligibility or Eligibility.of(rule, node_map)
    for obj, current in objects:
        ideal = plan(obj, rule, node_map, keep_current=False, eligibility=el, explain=False)
        if len(ideal.desired) != rule.replicas or set(ideal.desired) == set(current):
            continue  # not placeable in full (a repair's matter), or already the ideal
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


def _generation(inp: ReconcileInput, failed: FailedTask | None) -> int:
    if failed is None:
        return inp.generation
    return max(inp.generation, failed.generation + 1)


def _draining(node_map: NodeMap, vid: VolumeId) -> bool:
    volume = node_map.get(vid)
    return volume is not None and volume.state is VolumeState.DRAINING


def _requeue(waits: Iterable[float]) -> float | None:
    positive = [w for w in waits if w > 0]
    return min(positive) if positive else None
