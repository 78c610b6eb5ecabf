"""The `demand:` section and service consumers: accepted forms, canonical form, schema, explain,
and every problem reported at its file:line:column with a hint."""

from __future__ import annotations

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cim_place.policies.codec import consumers_to_dict, policy_to_dict
from cim_place.policies.explain import summarize
from cim_place.policies.model import Consumer, Demand, Policy, Replicas
from cim_place.policies.problems import PolicyValidationError, Problem
from cim_place.policies.schema import policy_file_schema
from cim_place.policies.validate import consumers_from_dict, load_text, policy_from_dict

BASE = "name: hot\nreplicas: 3\n"


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(PolicyValidationError) as info:
        load_text(text, "p.yaml")
    return list(info.value.problems)


def demand_of(text: str) -> Demand | None:
    policy = load_text(BASE + text, "p.yaml").policy_set.policy("hot")
    assert policy is not None
    return policy.demand


def test_the_issue_example_is_read() -> None:
    demand = demand_of(
        "demand: {follow: readers, min_reads: 5, window: 10m, max_extra: 2, keep: 1h, "
        "budget: 20%}\n"
    )
    assert demand == Demand("readers", 5, 600, 2, 3600, 20.0, None)


def test_defaults_and_absence() -> None:
    assert demand_of("") is None
    assert demand_of("demand: {}\n") == Demand()
    assert demand_of("demand: {follow: zone, budget: 500GiB}\n") == Demand(
        follow="zone", budget_percent=None, budget_bytes=500 * 2**30
    )
    assert demand_of("demand: {budget: 12.5%}\n") == Demand(budget_percent=12.5)


@pytest.mark.parametrize(
    ("section", "column", "message", "hint"),
    [
        ("{follow: writers}", 18, "unknown demand.follow 'writers'", "readers"),
        ("{min_reads: 0}", 21, "demand.min_reads must be between 1", "whole number"),
        ("{max_extra: -1}", 21, "demand.max_extra must be between 1", "whole number"),
        ("{window: 0}", 18, "demand.window must be longer than 0", "duration"),
        ("{window: soon}", 18, "demand.window: 'soon' is not a duration", "duration"),
        ("{window: 1h, keep: 10m}", 28, "demand.keep (10m) is shorter than", "at least as long"),
        ("{budget: 20}", 18, "demand.budget 20 has no unit", "20%"),
        ("{budget: 120%}", 18, "more than 0% and at most 100%", "share"),
        ("{budget: 0%}", 18, "more than 0% and at most 100%", "share"),
        ("{budget: lots}", 18, "demand.budget: 'lots' is not a size", "share"),
        ("{colour: red}", 10, "unknown key 'colour' in demand", "allowed"),
        ("{mn_reads: 3}", 10, "unknown key 'mn_reads'", "did you mean `min_reads`?"),
        ("5", 9, "expected a mapping for demand", ""),
    ],
)
def test_problems_name_line_column_and_hint(
    section: str, column: int, message: str, hint: str
) -> None:
    found = problems_of(BASE + f"demand: {section}\n")
    assert len(found) == 1, found
    problem = found[0]
    assert (problem.source, problem.line, problem.column) == ("p.yaml", 3, column), problem
    assert message in problem.message
    assert hint in problem.hint


def test_every_demand_problem_is_reported_at_once() -> None:
    found = problems_of(BASE + "demand:\n  min_reads: 0\n  window: x\n  budget: 7\n")
    assert [p.line for p in found] == [4, 5, 6]


def test_canonical_form_reads_back_unchanged() -> None:
    for text in (
        "demand: {follow: zone, min_reads: 2, window: 90s, max_extra: 1, keep: 2h, budget: 7.5%}\n",
        "demand: {budget: 1.5GB}\n",
        "demand: {}\n",
    ):
        policy = load_text(BASE + text).policy_set.policy("hot")
        assert policy is not None
        again = policy_from_dict(policy_to_dict(policy), "kv")
        assert again == policy
        assert "demand" in policy_to_dict(policy)


def test_schema_accepts_the_canonical_form_and_refuses_bad_sections() -> None:
    schema = policy_file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    policy = load_text(BASE + "demand: {budget: 25%, window: 5m}\n").policy_set.policies[0]
    validator.validate(policy_to_dict(policy))
    validator.validate(yaml.safe_load(BASE + "demand: {window: 10m, keep: 1h, budget: 2TiB}\n"))
    for bad in ("{follow: writers}", "{budget: 20}", "{min_reads: 0}", "{window: 0}", "{x: 1}"):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(yaml.safe_load(BASE + f"demand: {bad}\n"))


def test_explain_summarises_the_demand() -> None:
    policy = load_text(BASE + "demand: {min_reads: 5, window: 10m, keep: 1h}\n").policy_set
    line = summarize(policy.policies[0])
    assert "up to 2 cached copies on each reading node after 5 reads in 10m" in line
    assert "dropped after 1h unread, node budget 20% of capacity" in line


def test_a_consumer_may_be_a_service() -> None:
    text = (
        "consumers:\n"
        "  shop: {service: shop-web}\n"
        "  blog: {zone: eu-2, service: blog@web}\n"
        "---\n" + BASE + "locality: {near: [shop, blog]}\n"
    )
    loaded = load_text(text)
    assert loaded.policy_set.consumers == (
        Consumer("blog", {"zone": "eu-2"}, "blog@web"),
        Consumer("shop", {}, "shop-web"),
    )
    stored = consumers_to_dict(loaded.policy_set.consumers)
    assert stored == {
        "blog": {"zone": "eu-2", "service": "blog@web"},
        "shop": {"service": "shop-web"},
    }
    assert consumers_from_dict(stored, "kv") == loaded.policy_set.consumers


def test_a_bad_service_is_reported() -> None:
    found = problems_of("consumers:\n  shop: {service: 'no spaces'}\n")
    assert len(found) == 1
    assert (found[0].line, found[0].column) == (2, 19)
    assert "'no spaces' is not a valid service" in found[0].message
    assert "identity" in found[0].hint


@settings(max_examples=100, deadline=None)
@given(
    follow=st.sampled_from(["readers", "zone"]),
    min_reads=st.integers(1, 1_000_000),
    window=st.integers(1, 10**6),
    extra_keep=st.integers(0, 10**6),
    max_extra=st.integers(1, 100),
    budget=st.one_of(
        st.integers(1, 10_000).map(lambda n: (n / 100, None)),
        st.integers(1, 2**50).map(lambda n: (None, n)),
    ),
)
def test_any_demand_reads_back_from_its_canonical_form(
    follow: str,
    min_reads: int,
    window: int,
    extra_keep: int,
    max_extra: int,
    budget: tuple[float | None, int | None],
) -> None:
    demand = Demand(
        follow="zone" if follow == "zone" else "readers",
        min_reads=min_reads,
        window_seconds=window,
        max_extra=max_extra,
        keep_seconds=window + extra_keep,
        budget_percent=budget[0],
        budget_bytes=budget[1],
    )
    policy = Policy(name="hot", replicas=Replicas(3, 3), demand=demand)
    assert policy_from_dict(policy_to_dict(policy), "kv") == policy
