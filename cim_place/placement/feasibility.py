"""Whether a topology can satisfy a rule at all, and if not, which constraint stops it.

Two readers: the planner, which names the constraint when an object gets fewer copies than
desired (the status's ``Degraded`` condition says it), and the controller, which checks every
policy in use against the node map once per summary, so ``status`` and ``nodes`` warn once for
the domain ("operators ask for a warning when topology cannot meet redundancy") instead of once
per object. Pure: the node map in, messages out.

Constraints, checked in this order (the first that cannot be met is named):

- ``constraints``: fewer volumes pass the hard constraints (tags, labels, excluded nodes, down
  or draining) than copies are desired;
- ``capacity``: of those, fewer have room for the object (only for one object's plan);
- ``spread``: ``max_per_domain`` copies per domain at the cap level, over the domains that have
  usable volumes, add up to fewer than the copies desired;
- ``locality``: a hard locality has too few usable volumes near one of its consumers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cim_place.placement.model import FAR, PlacementRule, Volume

__all__ = ["Unmet", "unmet"]


@dataclass(frozen=True, slots=True)
class Unmet:
    """A constraint that keeps a rule from placing every desired copy: ``constraint`` is one of
    ``constraints``, ``capacity``, ``spread``, ``locality``; ``placeable`` the copies that fit."""

    constraint: str
    message: str
    placeable: int

    def __str__(self) -> str:
        return f"{self.constraint}: {self.message}"


def unmet(
    rule: PlacementRule,
    eligible: Sequence[Volume],
    *,
    refused: int = 0,
    full: Sequence[bool] | None = None,
    size: int = 0,
) -> Unmet | None:
    """The first constraint (module docstring) that ``eligible`` (the volumes passing the hard
    constraints; ``refused`` others did not) cannot meet, or None when every desired copy can be
    placed. ``full``, aligned with ``eligible``: the volumes without room for the object (of
    ``size`` bytes); None: room is not considered (the domain-wide check)."""
    want = rule.replicas
    if len(eligible) < want:
        return Unmet(
            "constraints",
            f"{want} copies desired but only {len(eligible)} volumes pass the policy's hard "
            f"constraints ({refused} refused: down, draining, excluded or lacking a tag or label); "
            "add matching volumes or relax the constraints",
            len(eligible),
        )
    roomy = [v for i, v in enumerate(eligible) if full is None or not full[i]]
    if len(roomy) < want:
        return Unmet(
            "capacity",
            f"{want} copies desired but only {len(roomy)} of {len(eligible)} eligible volumes "
            f"have room for {size} bytes; add capacity or drop content",
            len(roomy),
        )
    limit = rule.max_per_domain
    if limit is not None:
        level = rule.cap_domain_level
        per_domain: dict[tuple[str, ...], int] = {}
        for volume in roomy:
            key = volume.domain(level)
            per_domain[key] = per_domain.get(key, 0) + 1
        fits = sum(min(limit, n) for n in per_domain.values())
        if fits < want:
            name = level.name.lower()
            domains = ", ".join(
                "/".join(p for p in k if p) or "(unnamed)" for k in sorted(per_domain)
            )
            return Unmet(
                "spread",
                f"{want} copies desired, at most {limit} per {name}, but only {len(per_domain)} "
                f"{name}s have usable volumes ({domains}): at most {fits} copies fit; add a node "
                f"in another {name} or raise spread.max_per_domain",
                fits,
            )
    for locality in rule.localities:
        if not locality.hard or locality.min_local <= 0:
            continue
        near = [v for v in roomy if locality.distance(v) < FAR]
        if len(near) < locality.min_local:
            wanted = ", ".join(str(r) for r in locality.requirements) or "anywhere"
            return Unmet(
                "locality",
                f"{locality.min_local} copies must be near the consumer ({wanted}) but only "
                f"{len(near)} usable volumes are; add a node near it or make the locality soft",
                want - (locality.min_local - len(near)),
            )
    return None
