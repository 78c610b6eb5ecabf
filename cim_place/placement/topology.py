"""Domain-wide warnings: the policies in use that the current topology cannot satisfy.

The controller calls :func:`topology_warnings` when it writes the summary, so ``cim-place status``
and ``cim-place nodes`` say once for the domain that, say, a policy wants one copy in each of three
zones while only two zones have usable nodes, instead of every object saying it. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable

from cim_place.placement.eligibility import Eligibility
from cim_place.placement.feasibility import unmet
from cim_place.placement.model import NodeMap
from cim_place.placement.rules import CompiledPolicy

__all__ = ["topology_warnings"]


def topology_warnings(policies: Iterable[CompiledPolicy], node_map: NodeMap) -> list[str]:
    """One line per policy whose desired copies the node map cannot hold, naming the
    constraint (:mod:`placement.feasibility`), in policy name order."""
    out: list[str] = []
    for policy in sorted(policies, key=lambda p: p.name):
        el = Eligibility.of(policy.rule, node_map)
        why = unmet(policy.rule, el.eligible, refused=len(el.refused))
        if why is not None:
            out.append(
                f"policy {policy.name}: only {why.placeable} of {policy.rule.replicas} copies "
                f"can be placed ({why})"
            )
    return out
