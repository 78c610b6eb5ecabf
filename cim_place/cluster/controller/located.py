"""Consumers declared by a service identity, located by the reads of that service.

A policy's ``locality.near`` may name a consumer declared as ``{service: shop-web}``: the node
it runs at is the node its reads come from (the demand window's reads per service and node,
docs/DEMAND.md). The pure choice, with hysteresis so a service reading from two nodes does not
flap, is :func:`cim_place.placement.demand.locate_consumers`; this module keeps the previous
locations between passes and tells the controller when one moved, so it compiles its policies
again (and every object is looked at: a site that moved pulls its content after it).
"""

from __future__ import annotations

from cim_place.placement.demand import locate_consumers
from cim_place.placement.demand_window import DemandWindow
from cim_place.placement.model import NodeMap
from cim_place.policies.model import Consumer, PolicySet

__all__ = ["LocatedConsumers"]


class LocatedConsumers:
    """Where each service consumer was last placed (consumer name -> node)."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}

    def _locate(
        self, policies: PolicySet, window: DemandWindow, node_map: NodeMap, now: float
    ) -> tuple[tuple[Consumer, ...], dict[str, str]]:
        services = {c.service for c in policies.consumers if c.service}
        if not services:
            return policies.consumers, {}
        reads = {s: window.service_nodes(s, now, window.horizon) for s in sorted(services)}
        return locate_consumers(policies.consumers, reads, node_map, self.where)

    def consumers(
        self, policies: PolicySet, window: DemandWindow, node_map: NodeMap, now: float
    ) -> tuple[Consumer, ...]:
        """The consumers to compile ``policies`` with: service consumers located by their
        reads (the declared labels, or none, until reads are seen). Remembers the locations."""
        located, self.where = self._locate(policies, window, node_map, now)
        return located

    def moved(
        self, policies: PolicySet, window: DemandWindow, node_map: NodeMap, now: float
    ) -> bool:
        """Whether a service consumer is now located elsewhere than when last compiled."""
        return self._locate(policies, window, node_map, now)[1] != self.where
