"""Keeping cached copies out of the reconciler's way (pure).

The reconciler treats every confirmed copy that the planner does not want as surplus and drops
it, counts every pinned copy towards ``min``, and plans with present copies and fetch targets as
``current``. A cached copy must be none of these. So the controller reconciles an object on its
*required* input, with cached copies and the tasks that create or drop them removed
(:func:`required_input`), and adds the cached copies to the status afterwards
(:func:`with_cached`). The reconciler itself needs no change, and its result is the same as if
demand did not exist (``tests/placement/test_demand_reconcile.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import replace

from cim_place.placement.demand import cached_locations
from cim_place.placement.demand_cache import CachedCopy
from cim_place.placement.model import NodeMap, VolumeId
from cim_place.placement.reconcile_model import ReconcileInput, ReconcileResult


def required_input(inp: ReconcileInput, cached: Collection[VolumeId]) -> ReconcileInput:
    """``inp`` without the copies, tasks and failures on the volumes in ``cached`` (the
    object's cached copies and the volumes a demand fetch or drop is working on)."""
    if not cached:
        return inp
    return replace(
        inp,
        confirmed=[r for r in inp.confirmed if f"{r[0]}/{r[1]}" not in cached],
        in_flight=[t for t in inp.in_flight if f"{t.node}/{t.volume}" not in cached],
        failed=[f for f in inp.failed if f"{f.node}/{f.volume}" not in cached],
    )


def with_cached(
    result: ReconcileResult, copies: Iterable[CachedCopy], node_map: NodeMap
) -> ReconcileResult:
    """``result`` whose status also lists the cached copies (state ``cached``, with their
    cause); they change neither the object's state nor its count of copies."""
    rows = cached_locations(copies, node_map)
    if not rows:
        return result
    status = replace(result.status, locations=(*result.status.locations, *rows))
    return replace(result, status=status)
