"""Which policy applies to an object: selectors, priority, deterministic ties, the default."""

from __future__ import annotations

from pathlib import Path

from cim_place.policies.explain import explain, render
from cim_place.policies.model import BUILTIN_DEFAULT
from cim_place.policies.selectors import ObjectFacts, evaluate, match_policy
from cim_place.policies.validate import load_paths, load_text

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "policies"

SET = load_text(
    """
- name: default
  replicas: 3
- name: pdfs
  priority: 10
  match: {name: "*.pdf"}
  replicas: 2
- name: legal
  priority: 10
  match: {labels: ["dept in [legal, hr]"], owner: [alice]}
  replicas: 5
- name: big
  priority: 50
  match: {size: {min: 1GiB}, content_type: "video/*"}
  replicas: 1
  expire_after: 1d
- name: no-secrets
  priority: 5
  match: {labels: ["!secret", "kind"]}
  replicas: 2
""",
    "set.yaml",
).policy_set


def test_default_applies_when_nothing_matches() -> None:
    policy, reasons = match_policy(SET.policies, ObjectFacts(cid="bafy", name="a.txt"))
    assert policy.name == "default"
    assert "no policy matches" in reasons[0]


def test_builtin_default_when_no_default_is_declared() -> None:
    policies = [p for p in SET.policies if not p.is_default]
    policy, reasons = match_policy(policies, ObjectFacts(name="a.txt"))
    assert policy is BUILTIN_DEFAULT
    assert "built-in default" in reasons[0]


def test_highest_priority_wins_and_ties_break_by_name() -> None:
    obj = ObjectFacts(name="contract.pdf", owner="alice", metadata={"dept": "legal"})
    policy, reasons = match_policy(SET.policies, obj)
    assert policy.name == "legal"  # 'legal' < 'pdfs' at priority 10
    assert any("tie at priority 10" in r and "'legal'" in r and "'pdfs'" in r for r in reasons)
    # Order of the input never matters.
    again, _ = match_policy(list(reversed(SET.policies)), obj)
    assert again.name == "legal"


def test_every_selector_must_hold() -> None:
    legal = SET.policy("legal")
    assert legal is not None
    result = evaluate(legal, ObjectFacts(owner="bob", metadata={"dept": "legal"}))
    assert not result.matched
    assert any("owner 'bob' is not one of [alice]" in r for r in result.reasons)
    assert any("`dept in [legal, hr]` holds" in r for r in result.reasons)


def test_size_and_content_type_selectors() -> None:
    big = SET.policy("big")
    assert big is not None
    assert evaluate(big, ObjectFacts(size=2**31, content_type="video/mp4; codecs=x")).matched
    assert not evaluate(big, ObjectFacts(size=2**20, content_type="video/mp4")).matched
    unknown = evaluate(big, ObjectFacts(content_type="video/mp4"))
    assert not unknown.matched and "size unknown" in unknown.reasons[0]


def test_exists_and_absent_label_requirements() -> None:
    policy = SET.policy("no-secrets")
    assert policy is not None
    assert evaluate(policy, ObjectFacts(metadata={"kind": "x"})).matched
    assert not evaluate(policy, ObjectFacts(metadata={"kind": "x", "secret": "1"})).matched
    assert not evaluate(policy, ObjectFacts(metadata={})).matched


def test_examples_choose_as_documented() -> None:
    examples = load_paths([str(EXAMPLES)]).policy_set
    cases = [
        (ObjectFacts(name="docs/q3.pdf", content_type="application/pdf"), "documents"),
        (ObjectFacts(name="img/cat.png", content_type="image/png", size=50_000), "media"),
        (ObjectFacts(name="img/icon.png", content_type="image/png", size=200), "default"),
        (ObjectFacts(name="tmp/build.tar", metadata={"retention": "scratch"}), "scratch"),
        (ObjectFacts(name="tmp/build.tar"), "default"),
    ]
    for obj, expected in cases:
        assert match_policy(examples.policies, obj)[0].name == expected, obj


def test_explain_is_pure_and_renders_every_verdict() -> None:
    obj = ObjectFacts(cid="bafyx", name="report.pdf")
    explanation = explain(SET, obj)
    assert explanation.policy.name == "pdfs"
    text = render(explanation)
    assert "policy   pdfs: 2 copies" in text
    assert "match pdfs" in text and "no    legal" in text
    as_dict = explanation.to_dict()
    assert as_dict["policy"] == "pdfs"
    assert {v["policy"] for v in as_dict["evaluated"]} == {p.name for p in SET.policies}
