"""Step 7 of the reconciler: the status one object shows, merged with its previous status.

``removed`` or ``expired``, ``lost`` when no verified copy is present anywhere, ``degraded``,
``placed`` or ``progressing`` (see :mod:`cim_place.placement.reconciler`); conditions are merged
so ``last_transition`` moves only when a condition flips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from cim_place.objectstore import cid as cids
from cim_place.placement.model import NodeMap, Placement, VolumeId
from cim_place.placement.reconcile_model import Action, Drop, Fetch, ReconcileInput, Repair
from cim_place.placement.reconcile_view import _split, _View
from cim_place.placement.status import (
    Condition,
    Location,
    ObjectState,
    ObjectStatus,
    ReplicaState,
    merge_conditions,
)

__all__ = []


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
