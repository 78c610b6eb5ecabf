"""The vectorised planner for bulk re-plans (the periodic full pass, rebalance after a node joins).

:func:`plan_batch` returns, for many objects at once, exactly what :func:`planner.plan_key` returns
with no current copies (the balanced ideal). It computes the straw2 draws of a batch of objects
against every eligible volume as one matrix (:func:`eligibility.straw2_draws`, shared with the
scalar planner so scores are bit-identical), masks volumes that are full or over the load cap,
takes the best volume of each failure domain, and the best ``replicas`` domains. That is the
first pass of the scalar walk; rows it cannot settle exactly (too few usable domains, exactly
equal draws, a rule with locality) are handed to the scalar planner, so the results are
identical by construction.

Placements come back as a ``(objects, replicas)`` uint16 matrix of indices into
``node_map.volumes``, with :data:`NO_VOLUME` where a replica could not be placed: with the
objects' 64-bit keys that is a compact placement table (see bench/plan.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cim_place.errors import PlacementError
from cim_place.placement.eligibility import Eligibility, straw2_draws
from cim_place.placement.model import NodeMap, PlacementRule, SpreadLevel
from cim_place.placement.planner import plan_key

NO_VOLUME = 0xFFFF
"""Placement-table entry for a replica that could not be placed."""

VolumeIndices = npt.NDArray[np.uint16]


class _Columns:
    """Eligible volumes regrouped by failure domain at the rule's spread level (columns of the
    draw matrix), with the per-volume arrays in that order.

    Within a domain, volumes stay in id order, so "the first maximum" breaks ties by id as the
    scalar walk does. When every domain has the same number of volumes (the usual layout), the
    columns are laid out slot-major (column ``j * domains + g`` is the ``j``-th volume of domain
    ``g``) so the best of each domain is a running elementwise maximum over contiguous slabs.
    """

    def __init__(self, el: Eligibility) -> None:
        level = el.rule.spread
        n = len(el.eligible)
        domains = [v.domain(level) for v in el.eligible]
        perm = sorted(range(n), key=lambda i: (domains[i], i))
        starts = [c for c in range(n) if c == 0 or domains[perm[c]] != domains[perm[c - 1]]]
        ends = [*starts[1:], n] if starts else []
        widths = {b - a for a, b in zip(starts, ends, strict=True)}
        self.one_per_domain = level is SpreadLevel.VOLUME or len(starts) == n
        self.width = widths.pop() if len(widths) == 1 and not self.one_per_domain else 0
        if self.width:
            groups = len(starts)
            perm = [perm[g * self.width + j] for j in range(self.width) for g in range(groups)]
        self.starts = np.array(starts, dtype=np.intp)
        self.ends = ends
        p = np.array(perm, dtype=np.intp)
        self.seeds = np.ascontiguousarray(el.seeds[p])
        self.weights = np.ascontiguousarray(el.weights[p])
        self.used = np.ascontiguousarray(el.used[p])
        self.free = np.ascontiguousarray(el.free[p])
        self.cap = None if el.cap_factor is None else np.ascontiguousarray(el.cap_factor[p])
        index = el.node_map.index
        self.volume_index = np.array([index(el.eligible[i].id) for i in perm], dtype=np.uint16)


def plan_batch(
    keys: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.int64],
    rule: PlacementRule,
    node_map: NodeMap,
    *,
    eligibility: Eligibility | None = None,
    batch_rows: int = 2048,
) -> VolumeIndices:
    """Desired volumes of many objects: row ``k`` equals
    ``plan_key(keys[k], sizes[k], rule, node_map, keep_current=False).desired`` as indices into
    ``node_map.volumes``, padded with :data:`NO_VOLUME`.

    ``batch_rows`` bounds the draw matrix (``batch_rows x volumes`` float64); 1-2k rows keep it
    in cache.
    """
    if len(node_map) >= NO_VOLUME:
        raise PlacementError(
            f"the batch planner indexes volumes with uint16 and cannot handle {len(node_map)} "
            f"volumes (at most {NO_VOLUME - 1}); plan objects one by one with planner.plan"
        )
    if keys.shape != sizes.shape or keys.ndim != 1:
        raise PlacementError("plan_batch needs 1-D keys and sizes of the same length")
    el = eligibility if eligibility is not None else Eligibility.of(rule, node_map)
    r = rule.replicas
    out = np.full((len(keys), r), NO_VOLUME, dtype=np.uint16)
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    cols = _Columns(el)
    groups = len(cols.starts)
    # One replica per spread domain respects any cap at the same or a narrower level (nested
    # domains); a cap at a wider level is left to the scalar walk.
    vectorisable = (
        groups >= r
        and not any(locality.min_local for locality in rule.localities)
        and rule.cap_domain_level >= rule.spread
    )
    rows = min(batch_rows, len(keys))
    work = (
        np.empty((rows, len(el.eligible)), dtype=np.uint64),
        np.empty((rows, len(el.eligible)), dtype=np.uint64),
    )
    for start in range(0, len(keys), batch_rows):
        stop = min(start + batch_rows, len(keys))
        if vectorisable:
            w = (work[0][: stop - start], work[1][: stop - start])
            unsettled = _first_pass(
                keys[start:stop], sizes[start:stop], el, cols, out[start:stop], w
            )
        else:
            unsettled = np.arange(stop - start)
        for row in unsettled.tolist():
            k = start + row
            placement = plan_key(
                int(keys[k]),
                int(sizes[k]),
                rule,
                node_map,
                keep_current=False,
                eligibility=el,
                explain=False,
            )
            ids = [node_map.index(v) for v in placement.desired]
            out[k, : len(ids)] = ids
    return out


def _first_pass(
    keys: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.int64],
    el: Eligibility,
    cols: _Columns,
    out: VolumeIndices,
    work: tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]],
) -> npt.NDArray[np.intp]:
    """Fill ``out`` for the rows one pass of distinct domains settles; return the other rows."""
    r = el.rule.replicas
    draws = straw2_draws(keys, cols.seeds, cols.weights, work=work)
    # Bounded load. Same float operations as the scalar walk, so the same volumes are refused.
    # A larger object only raises the cap, so checking the smallest one first skips the masks
    # whenever the cap binds nowhere (the common case).
    if bool((cols.free < sizes.max()).any()):
        draws[cols.free[None, :] < sizes[:, None]] = -np.inf
    if cols.cap is not None:
        smallest_total = float(el.used_total + int(sizes.min()) * r)
        if bool((cols.used > smallest_total * cols.cap).any()):
            totals = (el.used_total + sizes * r).astype(np.float64)
            draws[cols.used[None, :] > totals[:, None] * cols.cap[None, :]] = -np.inf
    best_col: npt.NDArray[np.intp] | None = None
    if cols.one_per_domain:
        best = draws
    elif cols.width:
        slabs = draws.reshape(len(draws), cols.width, -1)
        best = slabs[:, 0, :].copy()
        slot = np.zeros(best.shape, dtype=np.intp)
        for j in range(1, cols.width):
            # Strictly greater: on equal draws the earlier slot (the lower id) stays.
            greater = slabs[:, j, :] > best
            np.copyto(slot, j, where=greater)
            np.maximum(best, slabs[:, j, :], out=best)
        best_col = slot * best.shape[1] + np.arange(best.shape[1])[None, :]
    else:
        best = np.maximum.reduceat(draws, cols.starts, axis=1)
        best_col = np.empty(best.shape, dtype=np.intp)
        for g, (a, b) in enumerate(zip(cols.starts.tolist(), cols.ends, strict=True)):
            best_col[:, g] = a + np.argmax(draws[:, a:b], axis=1)
    groups = best.shape[1]
    width = min(r + 1, groups)
    if groups > width:
        top = np.argpartition(-best, width - 1, axis=1)[:, :width]
        top_draws = np.take_along_axis(best, top, axis=1)
        order = np.argsort(-top_draws, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
    else:
        top = np.argsort(-best, axis=1, kind="stable")[:, :width]
    top_draws = np.take_along_axis(best, top, axis=1)
    unsettled = ~np.isfinite(top_draws[:, r - 1])
    # Exactly equal draws: the scalar walk breaks the tie by volume id; leave it to it.
    for k in range(width - 1):
        unsettled |= top_draws[:, k] == top_draws[:, k + 1]
    chosen = top[:, :r]
    if best_col is not None:
        chosen = np.take_along_axis(best_col, chosen, axis=1)
    settled = ~unsettled
    out[settled] = cols.volume_index[chosen[settled]]
    result: npt.NDArray[np.intp] = np.flatnonzero(unsettled)
    return result
