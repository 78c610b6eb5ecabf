"""The replication policy model: what an operator asked for, independent of YAML and NATS.

Everything here is a frozen dataclass with normalised values (seconds, bytes, tuples), so a
policy can be compared, hashed and handed to the planner without knowing where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

FailureDomain = Literal["region", "zone", "host", "volume"]
FAILURE_DOMAINS: tuple[FailureDomain, ...] = ("region", "zone", "host", "volume")
"""Failure domains from the widest to the narrowest."""

LabelOp = Literal["=", "!=", "in", "not in", "exists", "not exists"]
LocalityMode = Literal["hard", "soft"]
DemandFollow = Literal["readers", "zone"]


@dataclass(frozen=True, slots=True)
class Replicas:
    """How many copies: never fewer than ``min`` (repair), none above ``max`` (trim)."""

    min: int
    max: int


@dataclass(frozen=True, slots=True)
class Spread:
    """Copies spread across ``domain``; at most ``max_per_domain`` copies share one domain.

    The planner always spreads as far apart as the topology allows; ``domain`` names the level at
    which ``max_per_domain`` is enforced.
    """

    domain: FailureDomain = "volume"
    max_per_domain: int = 1


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One requirement on a set of labels (node labels, or an object's metadata)."""

    key: str
    op: LabelOp
    values: tuple[str, ...] = ()

    def holds(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "not exists":
            return value is None
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        # "!=" and "not in": an absent label is not equal to anything.
        return value is None or value not in self.values

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "not exists":
            return f"!{self.key}"
        if self.op in ("=", "!="):
            return f"{self.key} {self.op} {self.values[0]}"
        return f"{self.key} {self.op} [{', '.join(self.values)}]"


@dataclass(frozen=True, slots=True)
class Constraints:
    """Hard requirements on the nodes/volumes that may hold a copy."""

    tags: tuple[str, ...] = ()
    """Every one of these tags is required."""
    labels: tuple[LabelRequirement, ...] = ()
    """Every requirement must hold on the node's labels."""
    exclude_nodes: tuple[str, ...] = ()
    """Node ids that never hold a copy."""


@dataclass(frozen=True, slots=True)
class Preference:
    """A soft, weighted preference: exactly one of ``tag`` or ``label`` is set."""

    weight: int
    tag: str | None = None
    label: LabelRequirement | None = None


@dataclass(frozen=True, slots=True)
class Locality:
    """``min_local`` copies at, or nearest to, each consumer in ``near``.

    Local copies count toward the policy's replicas. ``hard``: a copy that cannot be placed near
    the consumer is reported as a violation; ``soft``: nearness is only a strong preference.
    """

    near: tuple[str, ...]
    min_local: int = 1
    mode: LocalityMode = "soft"


@dataclass(frozen=True, slots=True)
class Repair:
    """How lost copies are replaced."""

    grace_seconds: int = 900
    """How long a copy may be missing (node away) before a replacement is made."""
    max_concurrent: int = 4
    """Repairs of this policy's objects running at the same time, domain-wide."""
    bandwidth_bytes_per_second: int | None = None
    """Upper bound on repair traffic; None means unlimited."""


@dataclass(frozen=True, slots=True)
class Demand:
    """Extra ``cached`` copies where the content is read (docs/DEMAND.md).

    An object read at least ``min_reads`` times within ``window_seconds`` from a node (``follow:
    readers``) or a zone (``follow: zone``) without a copy gains a cached copy there, at most
    ``max_extra`` per object; a cached copy not read for ``keep_seconds`` is dropped. A node spends
    at most ``budget_percent`` of its capacity (or ``budget_bytes``) on cached copies, least
    recently read first out. Cached copies never count towards ``replicas``.
    """

    follow: DemandFollow = "readers"
    min_reads: int = 5
    window_seconds: int = 600
    max_extra: int = 2
    keep_seconds: int = 3600
    budget_percent: float | None = 20.0
    """Share of each node's capacity that cached copies may use; None when ``budget_bytes`` is."""
    budget_bytes: int | None = None
    """An absolute budget per node instead of a share of its capacity."""


@dataclass(frozen=True, slots=True)
class Match:
    """Selectors over objects. Every selector that is set must hold (they are ANDed); within a
    selector, any of the listed values may match (they are ORed)."""

    names: tuple[str, ...] = ()
    """Globs over the object's name (``*`` also matches ``/``)."""
    owners: tuple[str, ...] = ()
    labels: tuple[LabelRequirement, ...] = ()
    """Requirements on the object's metadata."""
    size_min: int | None = None
    size_max: int | None = None
    content_types: tuple[str, ...] = ()
    buckets: tuple[str, ...] = ()
    """S3 buckets: an object stored through the S3 API carries its bucket in the metadata
    ``s3-bucket`` (cim_place.http.s3)."""
    """Globs over the content type, e.g. ``image/*``."""


@dataclass(frozen=True, slots=True)
class Policy:
    """One replication policy, normalised."""

    name: str
    replicas: Replicas
    description: str = ""
    priority: int = 0
    match: Match | None = None
    """None: this is the default policy, applied when no other policy matches."""
    spread: Spread = field(default_factory=Spread)
    constraints: Constraints = field(default_factory=Constraints)
    preferences: tuple[Preference, ...] = ()
    locality: Locality | None = None
    expire_after_seconds: int | None = None
    """Content may be dropped this long after it was stored; None: kept forever."""
    repair: Repair = field(default_factory=Repair)
    protected: bool = False
    """``cim-place rm`` refuses to remove the objects this policy governs."""
    keep_versions: int | None = None
    """A domain name pointing at such an object keeps this many versions in its history (the
    controller purges older ones); None: the names bucket's own limit."""
    demand: Demand | None = None
    """None: no copies beyond the required ones, whatever the reads."""

    @property
    def is_default(self) -> bool:
        return self.match is None


@dataclass(frozen=True, slots=True)
class Consumer:
    """A consumer of content (e.g. a website), declared by the node labels it runs at, or by the
    service identity whose observed reads and references locate it (``service``); with both, the
    labels say where it is until its reads are seen."""

    name: str
    labels: Mapping[str, str]
    service: str | None = None


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every policy and consumer of a domain (or of a set of files), as applied together."""

    policies: tuple[Policy, ...] = ()
    consumers: tuple[Consumer, ...] = ()

    def policy(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    def consumer(self, name: str) -> Consumer | None:
        return next((c for c in self.consumers if c.name == name), None)

    @property
    def default(self) -> Policy | None:
        return next((p for p in self.policies if p.is_default), None)


BUILTIN_DEFAULT = Policy(
    name="builtin-default",
    description="used when no policy matches and no default policy is declared",
    replicas=Replicas(min=3, max=3),
    spread=Spread(domain="zone", max_per_domain=1),
)
"""The policy of last resort: three copies, one per zone while zones last."""
