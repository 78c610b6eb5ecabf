"""Fair shares for bounded load: the copies per object each volume is expected to hold under a rule.

The load cap (planner step 3) refuses a new replica on a volume whose used bytes exceed
``(1 + eps)`` times its fair share. A share proportional to capacity alone assumes any volume
could hold any copy; the spread says otherwise. With zones ``{a, b}``, ``{c, d}``, ``{e}`` and
three copies one per zone, ``e`` holds a copy of every object (a third of all bytes), not the
fifth its capacity suggests; a capacity share made the cap refuse ``e`` and diverted copies into
another zone, or left them unplaced under a hard zone cap.

The share follows the walk of the planner, level by level from the rule's spread level down to
volumes (:func:`expected_copies`):

1. Group the volumes by failure domain at the level. A domain can take at most one copy of an
   object while there are at least as many domains as copies to place (the walk uses distinct
   domains first); otherwise one copy each and then the rest, up to as many as it has volumes;
   never more than ``max_per_domain`` at the rule's cap level.
2. Water-fill: each domain's expected copies per object is ``min(limit, lambda * weight)``, with
   ``lambda`` such that they add up to the copies to place (capacity weights; a domain whose
   limit binds gives the rest to the others). With too few domains, the copies beyond one per
   domain are water-filled the same way.
3. Recurse into each domain with its expected copies.

Each consumer's nearest volumes (those the walk fills first for it) take ``min_local`` copies
per object among themselves; a near volume's share is the largest of the estimates.

This is the expected load of the first-choice walk when no cap binds; straw2 over domains of
unequal weight draws the domains without replacement, which gives light domains slightly more
than the water-fill (within the cap's epsilon for weight ratios up to a few times). Pure: numbers
in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cim_place.placement.model import FAR, PlacementRule, SpreadLevel, Volume

__all__ = ["expected_copies", "water_fill"]

F64 = npt.NDArray[np.float64]


def water_fill(weights: Sequence[float], limits: Sequence[float], total: float) -> list[float]:
    """Shares ``min(limit_i, lambda * weight_i)`` adding up to ``min(total, sum(limits))``.

    Deterministic (depends only on the inputs, in order); a zero weight gets nothing unless
    every positive weight is at its limit.
    """
    n = len(weights)
    room = sum(limits)
    if total >= room:
        return [float(x) for x in limits]
    out = [0.0] * n
    # Fill in order of the lambda at which each item reaches its limit; items reaching it first
    # are pinned there and the rest share what remains in proportion to their weights.
    order = sorted(
        (i for i in range(n) if weights[i] > 0), key=lambda i: (limits[i] / weights[i], i)
    )
    remaining = float(total)
    weight_left = sum(weights[i] for i in order)
    for pos, i in enumerate(order):
        if weight_left <= 0:
            break
        lam = remaining / weight_left
        if lam * weights[i] >= limits[i]:
            out[i] = float(limits[i])
            remaining -= limits[i]
            weight_left -= weights[i]
            continue
        for j in order[pos:]:
            out[j] = lam * weights[j]
        return out
    return out


def expected_copies(rule: PlacementRule, volumes: Sequence[Volume]) -> F64:
    """Expected copies per object of each volume in ``volumes`` (aligned), adding up to the
    replicas the rule can place there (module docstring). Weights are capacity weights."""
    n = len(volumes)
    shares = np.zeros(n, dtype=np.float64)
    if n == 0:
        return shares
    weights = [v.base_weight for v in volumes]
    _fill(rule, volumes, weights, list(range(n)), float(rule.replicas), rule.spread, shares)
    for locality in rule.localities:
        if locality.min_local <= 0:
            continue
        distance = [locality.distance(v) for v in volumes]
        nearest = min(distance)
        if nearest < FAR:
            near = [i for i in range(n) if distance[i] == nearest]
            local = np.zeros(n, dtype=np.float64)
            _fill(rule, volumes, weights, near, float(locality.min_local), rule.spread, local)
            np.maximum(shares, local, out=shares)
    return shares


def _fill(
    rule: PlacementRule,
    volumes: Sequence[Volume],
    weights: Sequence[float],
    members: list[int],
    copies: float,
    level: SpreadLevel,
    out: F64,
) -> None:
    """Spread ``copies`` (expected per object) over ``members`` from ``level`` down."""
    if copies <= 0 or not members:
        return
    if level is SpreadLevel.VOLUME:
        shares = water_fill([weights[i] for i in members], [1.0] * len(members), copies)
        for i, share in zip(members, shares, strict=True):
            out[i] = share
        return
    groups: dict[tuple[str, ...], list[int]] = {}
    for i in members:
        groups.setdefault(volumes[i].domain(level), []).append(i)
    keys = sorted(groups)
    # Distinct domains first: one copy each while there are enough of them (a float number of
    # copies below 1 comes from a wider level and still needs only one domain).
    distinct = len(keys) >= math.ceil(copies - 1e-9)
    limits: list[float] = []
    for key in keys:
        limit = 1.0 if distinct else float(len(groups[key]))
        if rule.max_per_domain is not None and level is rule.cap_domain_level:
            limit = min(limit, float(rule.max_per_domain))
        limits.append(limit)
    domain_weights = [sum(weights[i] for i in groups[key]) for key in keys]
    if distinct:
        shares = water_fill(domain_weights, limits, copies)
    else:
        # Too few domains: the walk takes one copy in each, then the rest one level narrower.
        base = [min(1.0, limit) for limit in limits]
        extra = water_fill(
            domain_weights,
            [limit - b for limit, b in zip(limits, base, strict=True)],
            copies - sum(base),
        )
        shares = [b + e for b, e in zip(base, extra, strict=True)]
    narrower = SpreadLevel(level + 1)
    for key, share in zip(keys, shares, strict=True):
        _fill(rule, volumes, weights, groups[key], share, narrower, out)
