"""Property and fuzz tests: nothing an operator writes crashes the validator, and the canonical
form stored in KV reads back to the same policy."""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim_place.policies.codec import policy_to_dict
from cim_place.policies.loader import YamlFile
from cim_place.policies.model import (
    FAILURE_DOMAINS,
    Constraints,
    LabelRequirement,
    Locality,
    Match,
    Policy,
    Preference,
    Repair,
    Replicas,
    Spread,
)
from cim_place.policies.policy_limits import CONSTRAINT_KEYS, MATCH_KEYS, POLICY_KEYS
from cim_place.policies.problems import PolicyValidationError
from cim_place.policies.selectors import ObjectFacts, evaluate, matches
from cim_place.policies.validate import load_text, policy_from_dict, validate_files

# CIM_PLACE_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the suite fast.
EXAMPLES = int(os.environ.get("CIM_PLACE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

YAMLISH = st.lists(
    st.sampled_from(
        [*"abcz019 -:,[]{}&*!|>'\"#?%@`\n\t.\u00e9", "name", "replicas", "---", "<<", "\n  "]
    ),
    max_size=80,
).map("".join)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["zone", "7d", "10MiB", "eu-1", "hard", "*.pdf", "zone in [a, b]", "!x"]),
)
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
policy_keys = st.sampled_from([*POLICY_KEYS, *MATCH_KEYS, *CONSTRAINT_KEYS, "min", "max"])
policy_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(policy_keys, inner, max_size=6),
    max_leaves=30,
)


def validate_or_report(text: str) -> None:
    try:
        load_text(text, "fuzz.yaml")
    except PolicyValidationError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.line >= 1 and problem.column >= 1
            assert problem.message


@FUZZ
@given(st.text(max_size=300))
def test_random_text_never_crashes(text: str) -> None:
    validate_or_report(text)


@FUZZ
@given(YAMLISH)
def test_random_yamlish_text_never_crashes(text: str) -> None:
    validate_or_report(text)


@FUZZ
@given(st.lists(structures, min_size=1, max_size=3))
def test_random_structures_never_crash(documents: list[Any]) -> None:
    text = yaml.safe_dump_all(documents, allow_unicode=True)
    validate_or_report(text)


@FUZZ
@given(policy_like)
def test_random_policy_shaped_values_never_crash(value: Any) -> None:
    try:
        validate_files([YamlFile(source="value", text="", documents=[value])])
    except PolicyValidationError as exc:
        assert exc.problems


@FUZZ
@given(st.dictionaries(policy_keys, policy_like, max_size=8), st.text(max_size=5))
def test_policy_with_random_fields_never_crashes(fields: dict[str, Any], name: str) -> None:
    fields = {"name": name or "p", "replicas": 3, **fields}
    validate_or_report(yaml.safe_dump(fields))


# -- canonical form round trip -----------------------------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True)
words = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,8}", fullmatch=True)
requirements = st.one_of(
    st.builds(LabelRequirement, words, st.sampled_from(["=", "!="]), st.tuples(words)),
    st.builds(
        LabelRequirement,
        words,
        st.sampled_from(["in", "not in"]),
        st.lists(words, min_size=1, max_size=3, unique=True).map(tuple),
    ),
    st.builds(LabelRequirement, words, st.sampled_from(["exists", "not exists"])),
)
unique_tuple = st.lists(words, max_size=3, unique=True).map(tuple)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    expire = draw(st.none() | st.integers(1, 10**8))
    low = draw(st.integers(0 if expire else 1, 10))
    high = draw(st.integers(max(low, 1), 12))
    domain = draw(st.sampled_from(FAILURE_DOMAINS))
    per = 1 if domain == "volume" else draw(st.integers(1, 4))
    match = draw(
        st.none()
        | st.builds(
            Match,
            names=st.lists(
                st.sampled_from(["*.pdf", "docs/*", "a?c"]), min_size=1, unique=True
            ).map(tuple),
            owners=unique_tuple,
            labels=st.lists(requirements, max_size=3, unique=True).map(tuple),
            size_min=st.none() | st.integers(0, 10**6),
            size_max=st.none() | st.integers(10**6, 10**9),
            content_types=unique_tuple,
        )
    )
    locality = draw(
        st.none()
        | st.builds(
            Locality,
            near=st.lists(names, min_size=1, max_size=2, unique=True).map(tuple),
            min_local=st.integers(1, high),
            mode=st.sampled_from(["hard", "soft"]),
        )
    )
    return Policy(
        name=draw(names),
        description=draw(st.text(max_size=10)),
        priority=draw(st.integers(-1000, 1000)),
        match=match,
        replicas=Replicas(low, high),
        spread=Spread(domain, per),
        constraints=Constraints(
            tags=draw(unique_tuple),
            labels=tuple(draw(st.lists(requirements, max_size=2, unique=True))),
            exclude_nodes=draw(unique_tuple),
        ),
        preferences=tuple(
            draw(
                st.lists(
                    st.builds(Preference, st.integers(1, 1000), tag=words)
                    | st.builds(Preference, st.integers(1, 1000), label=requirements),
                    max_size=2,
                )
            )
        ),
        locality=locality,
        expire_after_seconds=expire,
        repair=Repair(
            grace_seconds=draw(st.integers(0, 10**6)),
            max_concurrent=draw(st.integers(1, 100)),
            bandwidth_bytes_per_second=draw(st.none() | st.integers(1, 10**10)),
        ),
    )


@FUZZ
@given(policies())
def test_canonical_form_reads_back_unchanged(policy: Policy) -> None:
    if (
        policy.match is not None
        and not any(
            (
                policy.match.names,
                policy.match.owners,
                policy.match.labels,
                policy.match.content_types,
            )
        )
        and policy.match.size_min is None
        and policy.match.size_max is None
    ):
        return  # an empty match is refused by design
    stored = json.loads(json.dumps(policy_to_dict(policy)))
    assert policy_from_dict(stored, "kv") == policy


objects = st.builds(
    ObjectFacts,
    cid=st.just("bafy"),
    name=st.none() | st.sampled_from(["a.pdf", "docs/x", "abc", "docs/a.pdf", ""]),
    owner=st.sampled_from(["", "alice", "bob"]),
    metadata=st.dictionaries(words, words, max_size=3),
    size=st.none() | st.integers(0, 10**10),
    content_type=st.none() | st.sampled_from(["image/png", "application/pdf; x=1", "text/plain"]),
)


@FUZZ
@given(policies(), objects)
def test_fast_match_agrees_with_the_explained_verdict(policy: Policy, obj: ObjectFacts) -> None:
    if policy.match is None:
        return
    assert matches(policy.match, obj) == evaluate(policy, obj).matched
