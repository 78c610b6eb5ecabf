"""The per-field rules of a policy file: one file's values read into model objects.

:class:`PolicyReader` reads a policy (match, replicas, spread, constraints, preferences,
locality, repair, demand) and the consumers of one file, recording a problem with its position
for each fault instead of stopping. The limits and key lists an operator may use are defined
here; checks that span policies and files live in :mod:`cim_place.policies.validate`.
"""

from __future__ import annotations

import difflib
import re
from typing import TypeVar

from cim_place.policies import labels as label_syntax
from cim_place.policies import quantities
from cim_place.policies.demand import SERVICE_HINT, SERVICE_RE, read_demand
from cim_place.policies.loader import INVALID, Path, YamlFile
from cim_place.policies.model import (
    FAILURE_DOMAINS,
    Constraints,
    Consumer,
    LabelRequirement,
    Locality,
    Match,
    Policy,
    Preference,
    Repair,
    Replicas,
    Spread,
)
from cim_place.policies.reader import YamlReader

__all__ = [
    "CONSTRAINT_KEYS",
    "LOCALITY_KEYS",
    "MATCH_KEYS",
    "MAX_KEEP_VERSIONS",
    "MAX_PRIORITY",
    "MAX_REPLICAS",
    "MAX_WEIGHT",
    "NAME_HINT",
    "NAME_RE",
    "NODE_RE",
    "POLICY_KEYS",
    "REPAIR_KEYS",
    "SET_KEYS",
    "TAG_RE",
    "PolicyReader",
]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NAME_HINT = "use 1-63 lowercase letters, digits, _ or -, starting with a letter or digit"
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NODE_RE = re.compile(r"^\S{1,255}$")

MAX_REPLICAS = 100
MAX_PRIORITY = 1_000_000
MAX_WEIGHT = 1000
MAX_KEEP_VERSIONS = 64
"""The names bucket keeps 64 revisions per name (cluster/nats/kv.py MAX_HISTORY)."""

POLICY_KEYS = (
    "name",
    "description",
    "priority",
    "match",
    "replicas",
    "spread",
    "constraints",
    "preferences",
    "locality",
    "expire_after",
    "repair",
    "protected",
    "keep_versions",
    "demand",
)
SET_KEYS = ("policies", "consumers")
MATCH_KEYS = ("name", "owner", "labels", "size", "content_type", "bucket")
CONSTRAINT_KEYS = ("tags", "labels", "exclude_nodes")
LOCALITY_KEYS = ("near", "min_local", "mode")
REPAIR_KEYS = ("grace", "max_concurrent", "bandwidth")

T = TypeVar("T")


class PolicyReader(YamlReader):
    """Reads one file's values into model objects, recording a problem for each fault."""

    def __init__(self, f: YamlFile) -> None:
        super().__init__(f)
        self.near_refs: list[tuple[str, Path]] = []
        self.names: list[tuple[str, Path]] = []
        """Every policy name read, valid policy or not, to find duplicates."""

    def label_requirements(
        self, value: object, path: Path, what: str
    ) -> tuple[LabelRequirement, ...] | None:
        if value is INVALID:
            return None
        result: list[LabelRequirement] = []
        ok = True
        if isinstance(value, dict):
            for key, item in value.items():
                if item is INVALID:
                    ok = False
                    continue
                try:
                    result.append(label_syntax.requirement_from_mapping(key, item))
                except ValueError as exc:
                    self.problem((*path, key), f"{what}: {exc}", label_syntax.EXPRESSION_HINT)
                    ok = False
        elif isinstance(value, list):
            for i, item in enumerate(value):
                text = self.string(item, (*path, i), f"a label requirement in {what}")
                if text is None:
                    ok = False
                    continue
                try:
                    result.append(label_syntax.parse_requirement(text))
                except ValueError as exc:
                    self.problem((*path, i), f"{what}: {exc}", label_syntax.EXPRESSION_HINT)
                    ok = False
        else:
            self.problem(
                path,
                f"expected a list of label requirements or a mapping for {what}, "
                f"got {quantities.type_name(value)}",
                'e.g. ["zone in [eu-1, eu-2]", "tier = gold"] or {zone: eu-1}',
            )
            return None
        return tuple(dict.fromkeys(result)) if ok else None

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

    def match(self, value: object, path: Path) -> Match | None:
        m = self.mapping(value, path, MATCH_KEYS, "match")
        if m is None:
            return None
        if not m:
            self.problem(
                path,
                "`match` is empty",
                "add selectors, or remove `match` to make this the default policy",
            )
            return None
        names = self.strings(m["name"], (*path, "name"), "match.name") if "name" in m else ()
        owners = self.strings(m["owner"], (*path, "owner"), "match.owner") if "owner" in m else ()
        reqs = (
            self.label_requirements(m["labels"], (*path, "labels"), "match.labels")
            if "labels" in m
            else ()
        )
        types = (
            self.strings(m["content_type"], (*path, "content_type"), "match.content_type")
            if "content_type" in m
            else ()
        )
        buckets = (
            self.strings(m["bucket"], (*path, "bucket"), "match.bucket") if "bucket" in m else ()
        )
        size_min = size_max = None
        if "size" in m:
            size = self.mapping(m["size"], (*path, "size"), ("min", "max"), "match.size")
            if size is not None:
                if not size:
                    self.problem(
                        (*path, "size"),
                        "match.size needs `min`, `max` or both",
                        "e.g. {min: 1MiB, max: 1GiB}",
                    )
                if "min" in size:
                    size_min = self.size(size["min"], (*path, "size", "min"), "match.size.min")
                if "max" in size:
                    size_max = self.size(size["max"], (*path, "size", "max"), "match.size.max")
                if size_min is not None and size_max is not None and size_min > size_max:
                    self.problem(
                        (*path, "size", "min"),
                        f"match.size.min ({size_min}) is greater than match.size.max ({size_max})",
                        "swap them",
                    )
        if names is None or owners is None or reqs is None or types is None or buckets is None:
            return None
        return Match(
            names=names,
            owners=owners,
            labels=reqs,
            size_min=size_min,
            size_max=size_max,
            content_types=types,
            buckets=buckets,
        )

    def spread(self, value: object, path: Path) -> Spread | None:
        domain_hint = f"one of {', '.join(FAILURE_DOMAINS)}, widest first"
        if isinstance(value, str):
            m: dict[str, object] | None = {"domain": value}
            domain_path = path
        else:
            m = self.mapping(value, path, ("domain", "max_per_domain"), "spread")
            domain_path = (*path, "domain")
        if m is None:
            return None
        if "domain" not in m:
            self.problem(path, "spread needs a `domain`", domain_hint)
            return None
        domain = self.string(m["domain"], domain_path, "failure domain")
        if domain is not None and domain not in FAILURE_DOMAINS:
            close = difflib.get_close_matches(domain, FAILURE_DOMAINS, n=1)
            self.problem(
                domain_path,
                f"unknown failure domain {domain!r}",
                f"did you mean `{close[0]}`?" if close else domain_hint,
            )
            domain = None
        per = 1
        if "max_per_domain" in m:
            got = self.integer(
                m["max_per_domain"],
                (*path, "max_per_domain"),
                "spread.max_per_domain",
                1,
                MAX_REPLICAS,
            )
            if got is None:
                return None
            per = got
        if domain is None:
            return None
        if domain == "volume" and per > 1:
            self.problem(
                (*path, "max_per_domain"),
                "two copies never share a volume",
                "use max_per_domain: 1 with domain volume, or spread over hosts",
            )
            return None
        for known in FAILURE_DOMAINS:
            if known == domain:
                return Spread(domain=known, max_per_domain=per)
        return None

    def constraints(self, value: object, path: Path) -> Constraints | None:
        m = self.mapping(value, path, CONSTRAINT_KEYS, "constraints")
        if m is None:
            return None
        tags = (
            self.strings(m["tags"], (*path, "tags"), "tag", TAG_RE, "letters, digits, _ . -")
            if "tags" in m
            else ()
        )
        reqs = (
            self.label_requirements(m["labels"], (*path, "labels"), "constraints.labels")
            if "labels" in m
            else ()
        )
        nodes = (
            self.strings(
                m["exclude_nodes"],
                (*path, "exclude_nodes"),
                "node id",
                NODE_RE,
                "a node id has no spaces",
            )
            if "exclude_nodes" in m
            else ()
        )
        if tags is None or reqs is None or nodes is None:
            return None
        return Constraints(tags=tags, labels=reqs, exclude_nodes=nodes)

    def preferences(self, value: object, path: Path) -> tuple[Preference, ...] | None:
        items = self.expect(value, path, list, "a list of preferences")
        if items is None:
            return None
        result: list[Preference] = []
        ok = True
        for i, item in enumerate(items):
            p = (*path, i)
            m = self.mapping(item, p, ("tag", "label", "weight"), "a preference")
            if m is None:
                ok = False
                continue
            if ("tag" in m) == ("label" in m):
                self.problem(
                    p,
                    "a preference names exactly one `tag` or one `label`",
                    "e.g. {tag: ssd, weight: 50}",
                )
                ok = False
                continue
            if "weight" not in m:
                self.problem(
                    p,
                    "a preference needs a `weight`",
                    f"a whole number from 1 to {MAX_WEIGHT}, e.g. weight: 50",
                )
                ok = False
                continue
            weight = self.integer(m["weight"], (*p, "weight"), "weight", 1, MAX_WEIGHT)
            if "tag" in m:
                tag = self.string(m["tag"], (*p, "tag"), "tag", TAG_RE, "letters, digits, _ . -")
                if tag is None or weight is None:
                    ok = False
                    continue
                result.append(Preference(weight=weight, tag=tag))
            else:
                text = self.string(m["label"], (*p, "label"), "label requirement")
                req = None
                if text is not None:
                    try:
                        req = label_syntax.parse_requirement(text)
                    except ValueError as exc:
                        self.problem(
                            (*p, "label"), f"preference: {exc}", label_syntax.EXPRESSION_HINT
                        )
                if req is None or weight is None:
                    ok = False
                    continue
                result.append(Preference(weight=weight, label=req))
        return tuple(result) if ok else None

    def locality(self, value: object, path: Path, replicas: Replicas | None) -> Locality | None:
        m = self.mapping(value, path, LOCALITY_KEYS, "locality")
        if m is None:
            return None
        if "near" not in m:
            self.problem(
                path,
                "locality needs `near`: the consumer(s) to place copies near",
                "e.g. near: website-shop",
            )
            return None
        near = self.strings(m["near"], (*path, "near"), "consumer name", NAME_RE, NAME_HINT)
        if near is not None:
            if isinstance(m["near"], list):
                self.near_refs.extend(
                    (n, (*path, "near", i)) for i, n in enumerate(m["near"]) if isinstance(n, str)
                )
            else:
                self.near_refs.extend((n, (*path, "near")) for n in near)
        min_local = 1
        if "min_local" in m:
            got = self.integer(
                m["min_local"], (*path, "min_local"), "locality.min_local", 1, MAX_REPLICAS
            )
            if got is None:
                return None
            min_local = got
            if replicas is not None and min_local > replicas.max:
                self.problem(
                    (*path, "min_local"),
                    f"min_local ({min_local}) is more than replicas.max ({replicas.max})",
                    "local copies count toward replicas: raise replicas or lower min_local",
                )
                return None
        mode = "soft"
        if "mode" in m:
            got_mode = self.string(m["mode"], (*path, "mode"), "locality mode")
            if got_mode not in ("hard", "soft"):
                if got_mode is not None:
                    self.problem(
                        (*path, "mode"),
                        f"unknown locality mode {got_mode!r}",
                        "hard (required) or soft (preferred)",
                    )
                return None
            mode = got_mode
        if near is None:
            return None
        return Locality(near=near, min_local=min_local, mode="hard" if mode == "hard" else "soft")

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
