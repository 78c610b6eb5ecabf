"""The planner's inputs and outputs: volumes, the node map, placement rules, placements and reasons.

These are plain immutable values. The planner reads nothing else: no clock, no NATS, no disk. The
policy model (``cim_place.policies``) is translated into a :class:`PlacementRule`, the planner's
narrow view of a policy; the controller's node projection becomes a :class:`NodeMap`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from cim_place.errors import PlacementError
from cim_place.objectstore.cid import Cid

VolumeId = str
"""A volume's stable id: ``<node id>/<volume name>``."""


class VolumeState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    """Up, but everything on it should move away; it takes no new replicas."""


class SpreadLevel(enum.IntEnum):
    """Failure-domain levels, widest first. ``VOLUME`` is the floor: no two replicas share one."""

    REGION = 0
    ZONE = 1
    HOST = 2
    VOLUME = 3


DomainKey = tuple[str, ...]


def volume_seed(volume_id: VolumeId) -> int:
    """The 64-bit seed of a volume in the rendezvous hash; depends only on the stable id, so a
    volume's scores do not change when other volumes come or go."""
    digest = hashlib.blake2b(volume_id.encode(), digest_size=8, person=b"cim-place-vol").digest()
    return int.from_bytes(digest, "little")


def object_key(cid: Cid) -> int:
    """The 64-bit key of an object in the rendezvous hash (a hash of its binary CID, so identity
    or otherwise non-random CIDs still spread evenly)."""
    digest = hashlib.blake2b(cid, digest_size=8, person=b"cim-place-obj").digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True, slots=True, kw_only=True)
class Volume:
    """One volume (a directory on one disk of one node): the unit that holds a replica.

    ``labels`` carry the failure-domain position (``region``, ``zone``, ``host``) and free-form
    labels; a missing ``host`` label means the node is its own host, a missing ``region`` or
    ``zone`` puts the volume in the unnamed region or zone (``""``). ``used`` and ``free`` are the
    bytes reported in the node map; the load cap compares ``used`` between volumes.
    """

    node: str
    name: str
    capacity: int
    free: int
    labels: Mapping[str, str] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    state: VolumeState = VolumeState.UP
    weight: float | None = None
    """Rendezvous weight; ``None`` means the capacity in bytes (only ratios matter)."""
    id: VolumeId = field(init=False)
    seed: int = field(init=False)

    def __post_init__(self) -> None:
        vid = f"{self.node}/{self.name}"
        if not self.node or not self.name or "/" in self.node:
            raise PlacementError(
                f"volume {vid!r}: node and volume name must be non-empty and the node id may not "
                "contain '/'; fix the agent's node id or volume configuration"
            )
        if self.capacity < 0 or self.free < 0:
            raise PlacementError(
                f"volume {vid}: capacity ({self.capacity}) and free ({self.free}) bytes must not "
                "be negative; check what the agent reports for this volume"
            )
        if self.weight is not None and not self.weight >= 0:
            raise PlacementError(f"volume {vid}: weight {self.weight} must be >= 0")
        object.__setattr__(self, "id", vid)
        object.__setattr__(self, "seed", volume_seed(vid))

    @property
    def used(self) -> int:
        return max(self.capacity - self.free, 0)

    @property
    def base_weight(self) -> float:
        return float(self.capacity) if self.weight is None else float(self.weight)

    @property
    def region(self) -> str:
        return self.labels.get("region", "")

    @property
    def zone(self) -> str:
        return self.labels.get("zone", "")

    @property
    def host(self) -> str:
        return self.labels.get("host", self.node)

    def label(self, key: str) -> str | None:
        """A label's value; ``node`` and ``host`` are always defined."""
        if key == "node":
            return self.node
        if key == "host":
            return self.host
        return self.labels.get(key)

    def domain(self, level: SpreadLevel) -> DomainKey:
        """The failure domain at ``level``, as a path (zone names need only be unique within
        their region, host names within their zone)."""
        if level is SpreadLevel.REGION:
            return (self.region,)
        if level is SpreadLevel.ZONE:
            return (self.region, self.zone)
        if level is SpreadLevel.HOST:
            return (self.region, self.zone, self.host)
        return (self.id,)


class NodeMap:
    """The volumes the planner may choose from, in id order (so input order never matters)."""

    __slots__ = ("_by_id", "_index", "volumes")

    def __init__(self, volumes: Iterable[Volume]) -> None:
        by_id: dict[VolumeId, Volume] = {}
        for volume in volumes:
            if volume.id in by_id:
                raise PlacementError(
                    f"volume {volume.id} appears twice in the node map; each node must report "
                    "each volume name once"
                )
            by_id[volume.id] = volume
        self.volumes: tuple[Volume, ...] = tuple(by_id[k] for k in sorted(by_id))
        self._by_id = by_id
        self._index = {v.id: i for i, v in enumerate(self.volumes)}

    def __len__(self) -> int:
        return len(self.volumes)

    def __contains__(self, volume_id: object) -> bool:
        return volume_id in self._by_id

    def get(self, volume_id: VolumeId) -> Volume | None:
        return self._by_id.get(volume_id)

    def index(self, volume_id: VolumeId) -> int:
        """Position of a volume in :attr:`volumes` (the batch planner's column/volume index)."""
        try:
            return self._index[volume_id]
        except KeyError:
            raise PlacementError(f"volume {volume_id} is not in the node map") from None


class LabelOp(enum.StrEnum):
    IN = "in"
    NOT_IN = "not_in"
    EXISTS = "exists"
    """The volume has the label (any value; ``values`` is ignored)."""
    NOT_EXISTS = "not_exists"
    """The volume lacks the label (``values`` is ignored)."""


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """``key in {values}``, ``key not in {values}``, ``key`` exists or ``key`` does not exist. A
    volume without the label fails ``in`` and passes ``not_in``."""

    key: str
    op: LabelOp
    values: frozenset[str] = frozenset()

    def matches(self, volume: Volume) -> bool:
        value = volume.label(self.key)
        if self.op is LabelOp.EXISTS:
            return value is not None
        if self.op is LabelOp.NOT_EXISTS:
            return value is None
        inside = value is not None and value in self.values
        return inside if self.op is LabelOp.IN else not inside

    def __str__(self) -> str:
        if self.op is LabelOp.EXISTS:
            return f"{self.key} exists"
        if self.op is LabelOp.NOT_EXISTS:
            return f"{self.key} does not exist"
        op = "in" if self.op is LabelOp.IN else "not in"
        return f"{self.key} {op} {{{', '.join(sorted(self.values))}}}"


@dataclass(frozen=True, slots=True)
class Preference:
    """A soft preference: volumes with ``tag`` (or with label ``key=value``, or meeting the label
    ``requirement``) have their rendezvous weight multiplied by ``weight``.

    Straw2 picks a volume first with probability proportional to its weight, so ``weight=2``
    makes a matching volume twice as likely to be chosen as an equal non-matching one, ``0.5``
    half as likely; a large factor (say 100) acts as "nearly always, when it fits". Several
    matching preferences multiply. Preferences never exclude a volume and never change the load
    cap's fair share (that uses the capacity weight).
    """

    weight: float
    tag: str | None = None
    label: tuple[str, str] | None = None
    requirement: LabelRequirement | None = None

    def __post_init__(self) -> None:
        named = sum(x is not None for x in (self.tag, self.label, self.requirement))
        if named != 1:
            raise PlacementError(
                "a preference names exactly one of a tag, a label=value or a label requirement"
            )
        if not self.weight > 0:
            raise PlacementError(
                f"preference weight {self.weight} must be > 0 (to exclude volumes use a "
                "required tag or a label requirement)"
            )

    def matches(self, volume: Volume) -> bool:
        if self.tag is not None:
            return self.tag in volume.tags
        if self.requirement is not None:
            return self.requirement.matches(volume)
        assert self.label is not None
        return volume.label(self.label[0]) == self.label[1]

    def sort_key(self) -> tuple[str, str, str, float]:
        if self.tag is not None:
            return ("tag", self.tag, "", self.weight)
        if self.requirement is not None:
            r = self.requirement
            return ("requirement", r.key, f"{r.op.value}:{','.join(sorted(r.values))}", self.weight)
        assert self.label is not None
        return ("label", self.label[0], self.label[1], self.weight)


# Labels that place a volume in the topology, most specific first. Free-form locality labels
# (say ``rack``) count as the most specific level.
_LOCALITY_LEVELS: Mapping[str, int] = {"node": 0, "host": 0, "zone": 1, "region": 2}
FAR = 3
"""Locality distance of a volume that is not near the consumer at all."""


@dataclass(frozen=True, slots=True)
class Locality:
    """Where a consumer runs (label requirements, e.g. ``zone in {eu-1a}``, ``host in {web1}``),
    and how many copies should sit at or nearest to it.

    Distance of a volume: 0 when it meets every requirement (same host when a host is named),
    1 when it meets the zone and region requirements (same zone), 2 when it meets the region
    requirements (same region), ``FAR`` otherwise. A level the consumer does not name does not
    make a volume near. ``hard``: local copies go only to volumes nearer than ``FAR``; when there
    are too few, the missing local copies are reported, not placed elsewhere.
    """

    requirements: tuple[LabelRequirement, ...]
    min_local: int = 1
    hard: bool = False

    def __post_init__(self) -> None:
        if self.min_local < 0:
            raise PlacementError(f"locality min_local {self.min_local} must be >= 0")
        canonical = tuple(sorted(self.requirements, key=_requirement_key))
        object.__setattr__(self, "requirements", canonical)

    def distance(self, volume: Volume) -> int:
        for level in range(FAR):
            relevant = [r for r in self.requirements if _LOCALITY_LEVELS.get(r.key, 0) >= level]
            if relevant and all(r.matches(volume) for r in relevant):
                return level
        return FAR


def _requirement_key(r: LabelRequirement) -> tuple[str, str, tuple[str, ...]]:
    return (r.key, r.op.value, tuple(sorted(r.values)))


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementRule:
    """The planner's narrow view of a replication policy.

    ``replicas`` copies are desired; ``min`` is the floor the reconciler never drops below (the
    planner only reports it). Spread: replicas go to distinct ``spread`` domains; when there are
    fewer such domains than replicas, to distinct domains one level lower, down to distinct
    volumes. ``max_per_domain`` (optional) is a hard cap of replicas per ``cap_level`` domain
    (default: the ``spread`` level) that even that fallback respects; a policy that spreads as far
    apart as possible but caps copies per zone says ``spread=REGION, cap_level=ZONE``.
    ``load_cap`` is the epsilon of bounded load: a volume whose used bytes exceed
    ``(1 + load_cap)`` times its fair share takes no new replica (``None``: no cap).
    """

    replicas: int
    min: int = 1
    spread: SpreadLevel = SpreadLevel.ZONE
    max_per_domain: int | None = None
    cap_level: SpreadLevel | None = None
    required_tags: frozenset[str] = frozenset()
    requirements: tuple[LabelRequirement, ...] = ()
    excluded_nodes: frozenset[str] = frozenset()
    preferences: tuple[Preference, ...] = ()
    locality: Locality | None = None
    also_near: tuple[Locality, ...] = ()
    """The further consumers of the locality, in order: each gets its own ``min_local`` copies
    at or nearest to it, as ``locality`` (the first) does; a copy near two consumers counts for
    both."""
    load_cap: float | None = 0.25

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise PlacementError(f"a rule needs at least 1 replica, not {self.replicas}")
        if not 0 <= self.min <= self.replicas:
            raise PlacementError(f"rule min {self.min} must be between 0 and {self.replicas}")
        if self.max_per_domain is not None and self.max_per_domain < 1:
            raise PlacementError(f"max_per_domain {self.max_per_domain} must be >= 1")
        if self.load_cap is not None and not self.load_cap >= 0:
            raise PlacementError(f"load_cap {self.load_cap} must be >= 0 (or None: no cap)")
        if self.also_near and self.locality is None:
            raise PlacementError("further consumers (also_near) need a first one (locality)")
        for locality in self.localities:
            if locality.min_local > self.replicas:
                raise PlacementError(
                    f"locality asks for {locality.min_local} local copies but the rule has only "
                    f"{self.replicas} replicas"
                )
        # Canonical order, so that equal rules give bit-identical weights (float products
        # depend on the order of their factors) and equal outputs.
        object.__setattr__(
            self, "requirements", tuple(sorted(self.requirements, key=_requirement_key))
        )
        object.__setattr__(
            self, "preferences", tuple(sorted(self.preferences, key=Preference.sort_key))
        )

    @property
    def localities(self) -> tuple[Locality, ...]:
        """Every consumer's locality, the first one first."""
        return (self.locality, *self.also_near) if self.locality is not None else ()

    @property
    def cap_domain_level(self) -> SpreadLevel:
        """The level at which ``max_per_domain`` counts replicas."""
        return self.spread if self.cap_level is None else self.cap_level

    def spread_levels(self) -> tuple[SpreadLevel, ...]:
        """The fallback chain: the spread level, then each narrower level down to volume."""
        return tuple(SpreadLevel(i) for i in range(self.spread, SpreadLevel.VOLUME + 1))

    def preference_factor(self, volume: Volume) -> float:
        factor = 1.0
        for preference in self.preferences:
            if preference.matches(volume):
                factor *= preference.weight
        return factor


@dataclass(frozen=True, slots=True)
class PlacedObject:
    """What the planner needs to know about an object."""

    cid: Cid
    size: int

    @property
    def key(self) -> int:
        return object_key(self.cid)


class Verdict(enum.StrEnum):
    """Why a volume was taken or refused; feeds ``cim-place policy explain``."""

    # taken
    RANKED = "chosen by rank"
    KEPT = "kept existing copy"
    LOCAL = "near the consumer"
    # refused
    CONSTRAINT = "constraint failed"
    EXCLUDED = "node excluded"
    DOWN = "volume down"
    DRAINING = "volume draining"
    NO_WEIGHT = "weight is zero"
    FULL = "not enough free space"
    OVER_CAP = "over load cap"
    DOMAIN_USED = "failure domain already used"
    DOMAIN_FULL = "max_per_domain reached"
    NOT_NEEDED = "ranked below the chosen volumes"
    SURPLUS = "existing copy not needed"


class Reason(NamedTuple):
    """The planner's verdict on one volume. ``rank`` is the 1-based straw2 rank among the
    eligible volumes (``None`` when hard constraints refused the volume). A named tuple: the
    planner makes one per volume per plan, so it must be cheap."""

    volume: VolumeId
    taken: bool
    verdict: Verdict
    detail: str = ""
    rank: int | None = None

    def __str__(self) -> str:
        head = "taken" if self.taken else "refused"
        rank = f" (ranked {self.rank})" if self.rank is not None else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.volume}: {head}, {self.verdict.value}{detail}{rank}"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an object's replicas should be: ``desired`` in choice order, a reason per volume of
    the node map, and ``degraded`` messages when fewer than the desired copies (or local copies)
    could be placed."""

    desired: tuple[VolumeId, ...]
    reasons: tuple[Reason, ...]
    degraded: tuple[str, ...] = ()

    def reason(self, volume_id: VolumeId) -> Reason | None:
        for reason in self.reasons:
            if reason.volume == volume_id:
                return reason
        return None
