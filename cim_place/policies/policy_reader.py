"""The per-field rules of a policy file: one file's values read into model objects.

:class:`PolicyReader` reads a policy (match, replicas, spread, constraints, preferences,
locality, repair, demand) and the consumers of one file, recording a problem with its position
for each fault instead of stopping. The sections that select objects and place copies are read in
:mod:`cim_place.policies.placement_rules`, the keys and limits are in
:mod:`cim_place.policies.policy_limits`; checks that span policies and files live in
:mod:`cim_place.policies.validate`.
"""

from __future__ import annotations

from cim_place.policies import labels as label_syntax
from cim_place.policies import quantities
from cim_place.policies.demand import SERVICE_HINT, SERVICE_RE, read_demand
from cim_place.policies.loader import INVALID, Path, YamlFile
from cim_place.policies.model import (
    Constraints,
    Consumer,
    Policy,
    Repair,
    Replicas,
    Spread,
)
from cim_place.policies.placement_rules import PlacementRulesReader
from cim_place.policies.policy_limits import (
    MAX_KEEP_VERSIONS,
    MAX_PRIORITY,
    MAX_REPLICAS,
    NAME_HINT,
    NAME_RE,
    POLICY_KEYS,
    REPAIR_KEYS,
)

__all__ = ["PolicyReader"]


class PolicyReader(PlacementRulesReader):
    """Reads one file's values into model objects, recording a problem for each fault."""

    def __init__(self, f: YamlFile) -> None:
        super().__init__(f)
        self.names: list[tuple[str, Path]] = []
        """Every policy name read, valid policy or not, to find duplicates."""

    # -- the policy ------------------------------------------------------------------------

    def policy(self, value: object, path: Path) -> Policy | None:
        doc = self.mapping(value, path, POLICY_KEYS, "a policy")
        if doc is None:
            return None
        count = len(self.f.problems)
        name = None
        if "name" not in doc:
            self.problem(path, "a policy needs a `name`", "add e.g. `name: documents`")
        else:
            name = self.string(doc["name"], (*path, "name"), "policy name", NAME_RE, NAME_HINT)
            if name is not None:
                self.names.append((name, path))
        if "replicas" not in doc:
            self.problem(
                path,
                f"policy {name or ''!r} has no `replicas`",
                "add e.g. `replicas: 3` or `replicas: {min: 2, max: 4}`",
            )
        description = ""
        if "description" in doc:
            description = (
                self.string(doc["description"], (*path, "description"), "description") or ""
            )
        priority = 0
        if "priority" in doc:
            priority = (
                self.integer(
                    doc["priority"], (*path, "priority"), "priority", -MAX_PRIORITY, MAX_PRIORITY
                )
                or 0
            )
        expire_after = None
        if "expire_after" in doc:
            expire_after = self.duration(
                doc["expire_after"], (*path, "expire_after"), "expire_after"
            )
            if expire_after == 0:
                self.problem(
                    (*path, "expire_after"),
                    "expire_after must be longer than 0",
                    "remove it to keep content forever",
                )
        replicas = (
            self.replicas(
                doc["replicas"],
                (*path, "replicas"),
                expire_after is not None or "expire_after" in doc,
            )
            if "replicas" in doc
            else None
        )
        match = self.match(doc["match"], (*path, "match")) if "match" in doc else None
        spread = self.spread(doc["spread"], (*path, "spread")) if "spread" in doc else Spread()
        constraints = (
            self.constraints(doc["constraints"], (*path, "constraints"))
            if "constraints" in doc
            else Constraints()
        )
        preferences = (
            self.preferences(doc["preferences"], (*path, "preferences"))
            if "preferences" in doc
            else ()
        )
        locality = (
            self.locality(doc["locality"], (*path, "locality"), replicas)
            if "locality" in doc
            else None
        )
        repair = self.repair(doc["repair"], (*path, "repair")) if "repair" in doc else Repair()
        protected = False
        if "protected" in doc:
            flag = self.expect(doc["protected"], (*path, "protected"), bool, "true or false")
            protected = bool(flag)
        keep_versions = None
        if "keep_versions" in doc:
            keep_versions = self.integer(
                doc["keep_versions"],
                (*path, "keep_versions"),
                "keep_versions",
                1,
                MAX_KEEP_VERSIONS,
            )
        demand = read_demand(self, doc["demand"], (*path, "demand")) if "demand" in doc else None
        # A part may be None without a new problem here: the loader reported it already.
        if (
            len(self.f.problems) > count
            or name is None
            or replicas is None
            or ("match" in doc and match is None)
            or ("locality" in doc and locality is None)
            or spread is None
            or constraints is None
            or preferences is None
            or repair is None
            or ("keep_versions" in doc and keep_versions is None)
            or ("demand" in doc and demand is None)
        ):
            return None
        return Policy(
            name=name,
            description=description,
            priority=priority,
            match=match,
            replicas=replicas,
            spread=spread,
            constraints=constraints,
            preferences=preferences,
            locality=locality,
            expire_after_seconds=expire_after,
            repair=repair,
            protected=protected,
            keep_versions=keep_versions,
            demand=demand,
        )

    def replicas(self, value: object, path: Path, expires: bool) -> Replicas | None:
        if isinstance(value, dict):
            m = self.mapping(value, path, ("min", "max"), "replicas")
            assert m is not None
            if "min" not in m and "max" not in m:
                self.problem(path, "replicas needs `min`, `max` or both", "e.g. {min: 2, max: 4}")
                return None
            low = (
                self.integer(m["min"], (*path, "min"), "replicas.min", 0, MAX_REPLICAS)
                if "min" in m
                else None
            )
            high = (
                self.integer(m["max"], (*path, "max"), "replicas.max", 0, MAX_REPLICAS)
                if "max" in m
                else None
            )
            if ("min" in m and low is None) or ("max" in m and high is None):
                return None
            low = high if low is None else low
            high = low if high is None else high
            assert low is not None and high is not None
        else:
            n = self.integer(value, path, "replicas", 0, MAX_REPLICAS)
            if n is None:
                return None
            low = high = n
        if low > high:
            self.problem(
                (*path, "min"),
                f"replicas.min ({low}) is greater than replicas.max ({high})",
                "min is the floor, max the ceiling: make min <= max",
            )
            return None
        if low == 0 and not expires:
            self.problem(
                path,
                "zero replicas without expiry: content could vanish at any time",
                "set replicas.min to at least 1, or set `expire_after`",
            )
            return None
        if high == 0:
            self.problem(
                path,
                "replicas.max is 0: no copy could ever be kept",
                "keep at least one copy; `expire_after` lets content go after a time",
            )
            return None
        return Replicas(min=low, max=high)

    def repair(self, value: object, path: Path) -> Repair | None:
        m = self.mapping(value, path, REPAIR_KEYS, "repair")
        if m is None:
            return None
        default = Repair()
        grace = (
            self.duration(m["grace"], (*path, "grace"), "repair.grace")
            if "grace" in m
            else default.grace_seconds
        )
        concurrent = (
            self.integer(
                m["max_concurrent"], (*path, "max_concurrent"), "repair.max_concurrent", 1, 10_000
            )
            if "max_concurrent" in m
            else default.max_concurrent
        )
        bandwidth = None
        if "bandwidth" in m:
            bandwidth = self.size(
                m["bandwidth"], (*path, "bandwidth"), "repair.bandwidth", per_second=True
            )
            if bandwidth == 0:
                self.problem(
                    (*path, "bandwidth"),
                    "repair.bandwidth must be more than 0",
                    "remove it for unlimited bandwidth",
                )
                return None
            if bandwidth is None:
                return None
        if grace is None or concurrent is None:
            return None
        return Repair(
            grace_seconds=grace, max_concurrent=concurrent, bandwidth_bytes_per_second=bandwidth
        )

    # -- consumers -------------------------------------------------------------------------

    def consumers(self, value: object, path: Path) -> list[tuple[Consumer, Path]]:
        m = self.expect(value, path, dict, "a mapping of consumer name to node labels")
        if m is None:
            return []
        result: list[tuple[Consumer, Path]] = []
        for name, labels_value in m.items():
            p = (*path, name)
            if not NAME_RE.match(name):
                self.problem(p, f"{name!r} is not a valid consumer name", NAME_HINT, key=True)
                continue
            labels = self.expect(
                labels_value, p, dict, f"a mapping of node labels for consumer {name!r}"
            )
            if labels is None:
                continue
            if not labels:
                self.problem(
                    p,
                    f"consumer {name!r} declares no labels",
                    "give the labels of where it runs, e.g. {zone: eu-1, host: web1}, or the "
                    "service whose reads locate it, e.g. {service: shop-web}",
                )
                continue
            clean: dict[str, str] = {}
            service: str | None = None
            for key, label in labels.items():
                if key == "service":
                    # Reserved: the consumer's reads locate it (docs/DEMAND.md), not a label.
                    service = self.string(label, (*p, key), "service", SERVICE_RE, SERVICE_HINT)
                    if service is not None:
                        clean[key] = service
                    continue
                if not label_syntax.LABEL_KEY_RE.match(key):
                    self.problem(
                        (*p, key),
                        f"{key!r} is not a label key",
                        "letters, digits, _ . / -",
                        key=True,
                    )
                    continue
                if (
                    isinstance(label, bool)
                    or not isinstance(label, str | int)
                    or not str(label).strip()
                ):
                    if label is not INVALID:
                        self.problem(
                            (*p, key),
                            f"label {key!r} of consumer {name!r} must be a non-empty string, "
                            f"got {quantities.type_name(label)}",
                            "quote the value",
                        )
                    continue
                clean[key] = str(label).strip()
            if len(clean) == len(labels):
                clean.pop("service", None)
                consumer = Consumer(name=name, labels=dict(sorted(clean.items())), service=service)
                result.append((consumer, p))
        return result
