"""Translating the world into the planner's terms: policies into rules, heartbeats into a node map.

Owns two adapters, both pure:

- :func:`rule_for` / :func:`compile_policy`: a :class:`~cim_place.policies.Policy` (the operator's
  YAML, normalised) becomes a :class:`PlacementRule` (the planner's narrow view) plus the knobs
  only the reconciler reads (:class:`CompiledPolicy`: the floor, the repair grace, the expiry).
- :func:`node_map_from` / :func:`liveness_from`: node heartbeats (anything shaped like
  ``cluster.registry.NodeRecord``; placement may not import cluster, so a :class:`NodeSnapshot`
  protocol describes what is read) become planner volumes and per-node liveness.

Translation choices (documented here because ``policy explain`` shows their effect):

- **Replicas**: ``replicas.max`` copies are desired; ``replicas.min`` is the floor.
- **Spread**: copies go to distinct zones first (distinct regions first for ``spread: region``),
  then hosts, then volumes, so they land as far apart as the topology allows. The policy's
  ``max_per_domain`` is a hard cap counted at the policy's ``domain`` (``cap_level``); for
  ``domain: volume`` it is implied (two copies never share a volume) and not passed on. Region
  diversity is sought only by region-spread policies: zones in different regions are distinct
  zones anyway, and starting at the zone level keeps the batch planner vectorised. The built-in
  default promises "one per zone while zones last" (docs/POLICIES.md), so its zone cap is soft.
- **Constraints**: tags -> ``required_tags``; label requirements -> planner requirements
  (``=`` and ``in`` -> in, ``!=`` and ``not in`` -> not in, ``key`` -> exists, ``!key`` -> does
  not exist); ``exclude_nodes`` -> ``excluded_nodes``.
- **Preferences**: the policy's integer weight ``w`` (1..1000) becomes the straw2 weight
  multiplier ``1 + w / 100`` (:func:`preference_factor`): weight 100 doubles a volume's chance to
  be picked first, 1000 makes it 11 times as likely, 1 is nearly neutral. A multiplier never
  excludes a volume.
- **Locality**: each consumer in ``near`` becomes a planner :class:`Locality` (its declared
  labels as ``key in {value}`` requirements, ``min_local``, hard or soft): the first is the
  rule's ``locality``, the others its ``also_near``, and the planner gives each its own
  ``min_local`` copies at or nearest to it (a copy as near one consumer as any volume is counts
  for it, whichever consumer it was placed for). A consumer
  declared only by its ``service`` counts once its reads have located it
  (:func:`cim_place.placement.demand.locate_consumers` fills in its labels); before that it is
  skipped.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cim_place.errors import PolicyError
from cim_place.placement.model import (
    LabelOp,
    LabelRequirement,
    Locality,
    NodeMap,
    PlacementRule,
    Preference,
    SpreadLevel,
    Volume,
    VolumeState,
)
from cim_place.policies.model import BUILTIN_DEFAULT, Consumer, Policy
from cim_place.policies.model import LabelRequirement as PolicyLabelRequirement

__all__ = [
    "CompiledPolicy",
    "Liveness",
    "NodeLiveness",
    "NodeSnapshot",
    "VolumeSnapshot",
    "compile_policy",
    "liveness_from",
    "node_map_from",
    "preference_factor",
    "requirement_for",
    "rule_for",
]

_LEVELS: Mapping[str, SpreadLevel] = {
    "region": SpreadLevel.REGION,
    "zone": SpreadLevel.ZONE,
    "host": SpreadLevel.HOST,
    "volume": SpreadLevel.VOLUME,
}


def preference_factor(weight: int) -> float:
    """The planner's multiplier for a policy preference weight (1..1000): ``1 + weight / 100``."""
    return 1.0 + weight / 100.0


def requirement_for(requirement: PolicyLabelRequirement) -> LabelRequirement:
    """A policy label requirement in the planner's terms (see the module docstring)."""
    values = frozenset(requirement.values)
    op = requirement.op
    if op in ("=", "in"):
        return LabelRequirement(requirement.key, LabelOp.IN, values)
    if op in ("!=", "not in"):
        return LabelRequirement(requirement.key, LabelOp.NOT_IN, values)
    if op == "exists":
        return LabelRequirement(requirement.key, LabelOp.EXISTS)
    return LabelRequirement(requirement.key, LabelOp.NOT_EXISTS)


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledPolicy:
    """A policy as the reconciler uses it: the planner's rule and the safety knobs."""

    name: str
    rule: PlacementRule
    min_copies: int
    """Never fewer confirmed copies on up nodes than this after a drop (and never fewer than 1)."""
    repair_grace: float
    """Seconds a copy on a node that went down still counts as present (state ``late``)."""
    expire_after: float | None = None
    """Seconds after an object was first seen that all its copies are dropped; None: never."""
    repair_max_concurrent: int = 4
    """Repair tasks of this policy's objects in flight at once, domain-wide."""
    repair_bandwidth: int | None = None
    """Bytes/s a repair's fetch may use on the node it runs on; None: unlimited."""


def compile_policy(policy: Policy, consumers: Iterable[Consumer] = ()) -> CompiledPolicy:
    """The rule and knobs of ``policy``; raises PolicyError naming a consumer it cannot find."""
    return CompiledPolicy(
        name=policy.name,
        rule=rule_for(policy, consumers),
        min_copies=policy.replicas.min,
        repair_grace=float(policy.repair.grace_seconds),
        repair_max_concurrent=policy.repair.max_concurrent,
        repair_bandwidth=policy.repair.bandwidth_bytes_per_second,
        expire_after=(
            None if policy.expire_after_seconds is None else float(policy.expire_after_seconds)
        ),
    )


def rule_for(policy: Policy, consumers: Iterable[Consumer] = ()) -> PlacementRule:
    """The planner's :class:`PlacementRule` for ``policy`` (translation: module docstring).

    ``consumers``: the declared consumers (``PolicySet.consumers``) that ``locality.near`` names.
    """
    desired = policy.replicas.max
    if desired < 1:
        raise PolicyError(
            f"policy {policy.name}: replicas.max is {desired}; at least one copy is needed "
            "(validate the policy file with `cim-place policy validate`)"
        )
    level = _LEVELS[policy.spread.domain]
    spread = SpreadLevel.REGION if level is SpreadLevel.REGION else SpreadLevel.ZONE
    max_per_domain: int | None = policy.spread.max_per_domain
    if level is SpreadLevel.VOLUME or policy == BUILTIN_DEFAULT:
        max_per_domain = None
    preferences = [_preference(p.weight, p.tag, p.label) for p in policy.preferences]
    locality: Locality | None = None
    near: list[Consumer] = []
    if policy.locality is not None and policy.locality.near:
        by_name = {c.name: c for c in consumers}
        for name in policy.locality.near:
            consumer = by_name.get(name)
            if consumer is None:
                declared = ", ".join(sorted(by_name)) or "none"
                raise PolicyError(
                    f"policy {policy.name}: locality names consumer {name!r}, which is not "
                    f"declared (declared: {declared}); declare it under `consumers:`"
                )
            # A consumer known only by its service has no place until its reads are seen
            # (placement.demand.locate_consumers gives it one); until then it places nothing.
            if consumer.labels:
                near.append(consumer)
    also_near: tuple[Locality, ...] = ()
    if near:
        assert policy.locality is not None
        min_local = min(policy.locality.min_local, desired)
        hard = policy.locality.mode == "hard"
        localities = [
            Locality(
                tuple(
                    LabelRequirement(key, LabelOp.IN, frozenset({value}))
                    for key, value in sorted(consumer.labels.items())
                ),
                min_local=min_local,
                hard=hard,
            )
            for consumer in near
        ]
        locality, also_near = localities[0], tuple(localities[1:])
    return PlacementRule(
        replicas=desired,
        min=min(policy.replicas.min, desired),
        spread=spread,
        cap_level=level if max_per_domain is not None else None,
        max_per_domain=max_per_domain,
        required_tags=frozenset(policy.constraints.tags),
        requirements=tuple(requirement_for(r) for r in policy.constraints.labels),
        excluded_nodes=frozenset(policy.constraints.exclude_nodes),
        preferences=tuple(preferences),
        locality=locality,
        also_near=also_near,
    )


def _preference(weight: int, tag: str | None, label: PolicyLabelRequirement | None) -> Preference:
    factor = preference_factor(weight)
    if tag is not None:
        return Preference(factor, tag=tag)
    if label is None:
        raise PolicyError("a preference names neither a tag nor a label; fix the policy file")
    return Preference(factor, requirement=requirement_for(label))


# -- heartbeats into the node map ----------------------------------------------------------------


class VolumeSnapshot(Protocol):
    """What is read of one volume of a heartbeat (``cluster.registry.VolumeStatus``)."""

    @property
    def name(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def free(self) -> int: ...


class NodeSnapshot(Protocol):
    """What is read of one node's heartbeat (``cluster.registry.NodeRecord`` fits as it is)."""

    @property
    def node(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def tags(self) -> Sequence[str]: ...
    @property
    def volumes(self) -> Sequence[VolumeSnapshot]: ...
    @property
    def heartbeat_at(self) -> float: ...


class Liveness(enum.StrEnum):
    UP = "up"
    LATE = "late"
    """The heartbeat is overdue; the node is not acted on."""
    DOWN = "down"
    """Gone (heartbeat expired or long overdue); its copies are lost once the grace has passed."""


@dataclass(frozen=True, slots=True)
class NodeLiveness:
    """A node's liveness and, when not up, since when (the clock of the heartbeats)."""

    state: Liveness
    since: float = 0.0


def _check_thresholds(late_after: float, down_after: float) -> None:
    if not 0 <= late_after <= down_after:
        raise ValueError(
            f"late_after ({late_after}) must be >= 0 and <= down_after ({down_after}): a node is "
            "late before it is down"
        )


def liveness_from(
    records: Iterable[NodeSnapshot],
    *,
    now: float,
    late_after: float,
    down_after: float,
    departed: Mapping[str, float] | None = None,
) -> dict[str, NodeLiveness]:
    """Liveness per node id from the last heartbeat of each node.

    A heartbeat older than ``late_after`` makes the node late (since its last beat); older than
    ``down_after``, down (since ``heartbeat_at + down_after``). ``departed``: nodes with no
    record any more (their key expired from the nodes bucket, or a NodeLeft event), mapped to
    the time they were seen to go; they are down since then, unless a record says otherwise.
    """
    _check_thresholds(late_after, down_after)
    out = {node: NodeLiveness(Liveness.DOWN, at) for node, at in (departed or {}).items()}
    for record in records:
        age = now - record.heartbeat_at
        if age > down_after:
            out[record.node] = NodeLiveness(Liveness.DOWN, record.heartbeat_at + down_after)
        elif age > late_after:
            out[record.node] = NodeLiveness(Liveness.LATE, record.heartbeat_at)
        else:
            out[record.node] = NodeLiveness(Liveness.UP)
    return out


def node_map_from(
    records: Sequence[NodeSnapshot],
    *,
    now: float,
    late_after: float,
    down_after: float,
    draining: set[str] | frozenset[str] = frozenset(),
) -> NodeMap:
    """The planner's volumes from node heartbeats.

    Volume ids are ``node/volume``; labels are the node's labels with ``host`` defaulting to the
    node id; tags, capacity and free bytes come from the heartbeat. State: ``down`` when the
    heartbeat is older than ``down_after``, else ``draining`` for nodes in ``draining``, else
    ``up``. A node that is merely late (older than ``late_after``) stays ``up`` here: the
    reconciler decides from its :class:`NodeLiveness` and the policy's grace what its copies
    count for, and the planner must keep them meanwhile. Keep the last record of a node that
    went away and pass it here (state ``down``), so its copies keep their failure domain.
    """
    _check_thresholds(late_after, down_after)
    volumes: list[Volume] = []
    for record in records:
        if now - record.heartbeat_at > down_after:
            state = VolumeState.DOWN
        elif record.node in draining:
            state = VolumeState.DRAINING
        else:
            state = VolumeState.UP
        labels = {"host": record.node, **record.labels}
        tags = frozenset(record.tags)
        for volume in record.volumes:
            volumes.append(
                Volume(
                    node=record.node,
                    name=volume.name,
                    capacity=volume.capacity,
                    free=volume.free,
                    labels=labels,
                    tags=tags,
                    state=state,
                )
            )
    return NodeMap(volumes)
