"""Which policy applies to an object, and why.

1. Every policy with a ``match`` is evaluated; all of its selectors must hold.
2. Among the matching policies the highest ``priority`` wins; a tie is broken by name
   (alphabetical first), and the tie is reported so the operator can resolve it.
3. When nothing matches, the default policy (the one without ``match``) applies; when there is
   none, the built-in default (3 copies across zones).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cim_place.policies.model import BUILTIN_DEFAULT, Match, Policy
from cim_place.policies.quantities import format_size

S3_BUCKET = "s3-bucket"
"""The metadata an object stored through the S3 API carries its bucket in (``match.bucket``)."""


@dataclass(frozen=True, slots=True)
class ObjectFacts:
    """What a policy can select on. Unknown facts are None/empty and never match a selector."""

    cid: str = ""
    name: str | None = None
    owner: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    size: int | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class MatchResult:
    """One policy's verdict on one object: matched or not, and a reason per selector."""

    policy: Policy
    matched: bool
    reasons: tuple[str, ...]


def evaluate(policy: Policy, obj: ObjectFacts) -> MatchResult:
    """Evaluate every selector of ``policy`` against ``obj`` (no short cut: explain shows all)."""
    if policy.match is None:
        return MatchResult(policy, False, ("default policy: applies only when nothing matches",))
    checks = list(_checks(policy.match, obj))
    return MatchResult(policy, all(ok for ok, _ in checks), tuple(why for _, why in checks))


def match_policy(policies: Iterable[Policy], obj: ObjectFacts) -> tuple[Policy, list[str]]:
    """The policy that applies to ``obj`` and the reasons for the choice."""
    candidates = sorted(policies, key=lambda p: (-p.priority, p.name))
    # Cheap boolean pass first; reasons are worded only for the policies that matter.
    matching = [p for p in candidates if p.match is not None and matches(p.match, obj)]
    if matching:
        chosen = matching[0]
        top = chosen.priority
        why = evaluate(chosen, obj).reasons
        reasons = [f"policy {chosen.name!r} matches: {'; '.join(why)}"]
        others = matching[1:]
        if others:
            listed = ", ".join(f"{p.name!r} (priority {p.priority})" for p in others)
            reasons.append(f"priority {top} is the highest of the matching policies ({listed})")
        tied = [p for p in matching if p.priority == top]
        if len(tied) > 1:
            names = ", ".join(repr(p.name) for p in tied)
            reasons.append(
                f"tie at priority {top} between {names}: {chosen.name!r} chosen as first "
                "by name (give one of them a higher priority to decide it)"
            )
        return chosen, reasons
    default = min((p for p in candidates if p.is_default), key=lambda p: p.name, default=None)
    if default is not None:
        return default, [f"no policy matches; the default policy {default.name!r} applies"]
    return BUILTIN_DEFAULT, [
        "no policy matches and no default policy is declared; the built-in default applies "
        "(declare a policy without `match` to choose the default)"
    ]


def matches(m: Match, obj: ObjectFacts) -> bool:
    """True when every selector of ``m`` holds for ``obj`` (the fast path of ``evaluate``)."""
    if m.names and (obj.name is None or not any(fnmatch.fnmatchcase(obj.name, g) for g in m.names)):
        return False
    if m.owners and obj.owner not in m.owners:
        return False
    if not all(req.holds(obj.metadata) for req in m.labels):
        return False
    if m.buckets and obj.metadata.get(S3_BUCKET) not in m.buckets:
        return False
    if m.size_min is not None or m.size_max is not None:
        if obj.size is None:
            return False
        if (m.size_min is not None and obj.size < m.size_min) or (
            m.size_max is not None and obj.size > m.size_max
        ):
            return False
    if m.content_types:
        if obj.content_type is None:
            return False
        ctype = _media_type(obj.content_type)
        return any(fnmatch.fnmatchcase(ctype, g.lower()) for g in m.content_types)
    return True


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _checks(m: Match, obj: ObjectFacts) -> Iterable[tuple[bool, str]]:
    if m.names:
        globs = _listed(m.names)
        if obj.name is None:
            yield False, f"object has no name (match.name wants {globs})"
        else:
            hit = next((g for g in m.names if fnmatch.fnmatchcase(obj.name, g)), None)
            yield (
                (True, f"name {obj.name!r} matches {hit!r}")
                if hit
                else (False, f"name {obj.name!r} matches none of {globs}")
            )
    if m.owners:
        ok = obj.owner in m.owners
        yield ok, f"owner {obj.owner!r} {'is' if ok else 'is not'} one of {_listed(m.owners)}"
    for req in m.labels:
        ok = req.holds(obj.metadata)
        value = obj.metadata.get(req.key)
        have = f"{req.key}={value!r}" if value is not None else f"no label {req.key!r}"
        yield ok, f"label requirement `{req}` {'holds' if ok else 'fails'} ({have})"
    if m.buckets:
        bucket = obj.metadata.get(S3_BUCKET)
        ok = bucket in m.buckets
        have = f"S3 bucket {bucket!r}" if bucket is not None else "not an S3 object"
        yield ok, f"{have} {'is' if ok else 'is not'} one of {_listed(m.buckets)}"
    if m.size_min is not None or m.size_max is not None:
        bounds = _size_bounds(m.size_min, m.size_max)
        if obj.size is None:
            yield False, f"size unknown (match.size wants {bounds})"
        else:
            ok = (m.size_min is None or obj.size >= m.size_min) and (
                m.size_max is None or obj.size <= m.size_max
            )
            yield ok, f"size {obj.size} bytes {'is' if ok else 'is not'} {bounds}"
    if m.content_types:
        globs = _listed(m.content_types)
        if obj.content_type is None:
            yield False, f"content type unknown (match.content_type wants {globs})"
        else:
            ctype = _media_type(obj.content_type)
            hit = next((g for g in m.content_types if fnmatch.fnmatchcase(ctype, g.lower())), None)
            yield (
                (True, f"content type {ctype!r} matches {hit!r}")
                if hit
                else (False, f"content type {ctype!r} matches none of {globs}")
            )


def _listed(values: Iterable[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _size_bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {format_size(low)} and {format_size(high)}"
    if low is not None:
        return f"at least {format_size(low)}"
    return f"at most {format_size(high or 0)}"
