"""The placement rules of a policy: which objects it selects and where their copies may go.

This module owns :class:`PlacementRulesReader`, the readers of a policy's ``match`` (which
objects), ``spread`` (across failure domains), ``constraints`` (nodes allowed), ``preferences``
(nodes preferred) and ``locality`` (near a consumer) sections and of label requirements, each
recording a problem with its position for every fault instead of stopping.
:class:`~cim_place.policies.policy_reader.PolicyReader` builds on it for the whole policy.
"""

from __future__ import annotations

import difflib

from cim_place.policies import labels as label_syntax
from cim_place.policies import quantities
from cim_place.policies.loader import INVALID, Path, YamlFile
from cim_place.policies.model import (
    FAILURE_DOMAINS,
    Constraints,
    LabelRequirement,
    Locality,
    Match,
    Preference,
    Replicas,
    Spread,
)
from cim_place.policies.policy_limits import (
    CONSTRAINT_KEYS,
    LOCALITY_KEYS,
    MATCH_KEYS,
    MAX_REPLICAS,
    MAX_WEIGHT,
    NAME_HINT,
    NAME_RE,
    NODE_RE,
    TAG_RE,
)
from cim_place.policies.reader import YamlReader

__all__ = ["PlacementRulesReader"]


class PlacementRulesReader(YamlReader):
    """Reads the selection and placement sections of a policy (see :class:`PolicyReader`)."""

    def __init__(self, f: YamlFile) -> None:
        super().__init__(f)
        self.near_refs: list[tuple[str, Path]] = []
        """Every consumer named in ``locality.near``, to check they exist."""

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
