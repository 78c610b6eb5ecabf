"""Policy files: what is accepted, and how every problem is reported (file:line:column + hint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cim_place.errors import PolicyError
from cim_place.policies.codec import policy_to_dict
from cim_place.policies.model import LabelRequirement, Replicas, Spread
from cim_place.policies.problems import PolicyValidationError, Problem
from cim_place.policies.validate import load_paths, load_text, policy_from_dict

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "policies"


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(PolicyValidationError) as info:
        load_text(text, "p.yaml")
    assert isinstance(info.value, PolicyError)
    return list(info.value.problems)


def only(text: str) -> Problem:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("name", ["default", "documents", "media", "scratch"])
def test_each_example_file_is_valid_on_its_own(name: str) -> None:
    loaded = load_paths([str(EXAMPLES / f"{name}.yaml")])
    assert [p.name for p in loaded.policy_set.policies] == [name]


def test_the_example_directory_is_valid_as_one_set() -> None:
    loaded = load_paths([str(EXAMPLES)])
    names = [p.name for p in loaded.policy_set.policies]
    assert names == ["default", "documents", "media", "scratch"]
    assert [c.name for c in loaded.policy_set.consumers] == ["website-blog", "website-shop"]
    default = loaded.policy_set.default
    assert default is not None and default.replicas == Replicas(3, 3)
    assert default.spread == Spread("host", 1)  # one per zone while zones last (its comment)
    scratch = loaded.policy_set.policy("scratch")
    assert scratch is not None and scratch.expire_after_seconds == 7 * 86400
    media = loaded.policy_set.policy("media")
    assert media is not None and media.locality is not None
    assert media.locality.near == ("website-shop", "website-blog")
    assert media.repair.bandwidth_bytes_per_second == 20 * 2**20
    documents = loaded.policy_set.policy("documents")
    assert documents is not None
    assert documents.constraints.tags == ("ssd",)
    assert documents.constraints.labels == (LabelRequirement("region", "in", ("eu",)),)
    # The source text of each policy is kept, comments included, for `show`.
    assert loaded.sources["documents"].text.startswith("name: documents")
    assert "# the highest-priority" in loaded.sources["documents"].text


def test_full_policy_normalises_every_field() -> None:
    loaded = load_text(
        """
consumers:
  shop: {zone: eu-1, host: web1, rack: 7}
policies:
  - name: docs
    description: d
    priority: -3
    match:
      name: "*.pdf"
      owner: [alice, bob]
      labels: ["class in [a, b]", "!secret", "kind", "tier != gold"]
      size: {min: 1KB, max: 1.5GiB}
      content_type: application/pdf
    replicas: {min: 2}
    spread: {domain: host, max_per_domain: 2}
    constraints:
      tags: ssd
      labels: {zone: [eu-1, eu-2], region: eu}
      exclude_nodes: [n1]
    preferences:
      - {tag: nvme, weight: 5}
      - {label: "zone = eu-1", weight: 1000}
    locality: {near: shop, min_local: 2, mode: hard}
    expire_after: 1h30m
    repair: {grace: 90, max_concurrent: 1, bandwidth: 1000}
""",
        "p.yaml",
    )
    p = loaded.policy_set.policies[0]
    assert p.replicas == Replicas(2, 2)
    assert p.priority == -3
    assert p.match is not None
    assert p.match.names == ("*.pdf",)
    assert p.match.size_min == 1000 and p.match.size_max == int(1.5 * 2**30)
    assert [str(r) for r in p.match.labels] == [
        "class in [a, b]",
        "!secret",
        "kind",
        "tier != gold",
    ]
    assert [str(r) for r in p.constraints.labels] == ["zone in [eu-1, eu-2]", "region = eu"]
    assert p.expire_after_seconds == 5400
    assert p.repair.grace_seconds == 90
    assert loaded.policy_set.consumers[0].labels == {"host": "web1", "rack": "7", "zone": "eu-1"}
    assert policy_from_dict(policy_to_dict(p), "kv") == p


def test_every_problem_is_reported_at_once_with_positions() -> None:
    text = """\
name: bad
replicas: {min: 5, max: 2}
spread: {domain: rack}
locality: {near: nowhere}
colour: blue
match: {}
"""
    found = problems_of(text)
    by_line = {(p.line, p.column): p for p in found}
    assert len(found) == 5, found
    assert "greater than replicas.max" in by_line[(2, 17)].message
    assert "unknown failure domain 'rack'" in by_line[(3, 18)].message
    assert "did you mean" not in by_line[(3, 18)].hint
    assert "consumer 'nowhere' is not declared" in by_line[(4, 18)].message
    assert "unknown key 'colour'" in by_line[(5, 1)].message
    assert "`match` is empty" in by_line[(6, 8)].message
    assert all(p.hint for p in found)
    assert str(by_line[(5, 1)]).startswith("p.yaml:5:1: unknown key 'colour' in a policy (")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("name: a\nreplicas: 0\n", (2, 11), "zero replicas without expiry"),
        ("name: a\nreplicas: {min: 0, max: 2}\n", (2, 11), "zero replicas without expiry"),
        ("name: a\nreplicas: -1\n", (2, 11), "between 0 and 100"),
        ("name: a\nreplicas: three\n", (2, 11), "expected a whole number"),
        ("name: a\nreplicas: 3\nspread: zones\n", (3, 9), "unknown failure domain"),
        ("name: a\nreplicas: 3\nspread: {domain: volume, max_per_domain: 2}\n", (3, 42), "share"),
        ("name: A B\nreplicas: 3\n", (1, 7), "not a valid policy name"),
        ("replicas: 3\n", (1, 1), "needs a `name`"),
        ("name: a\n", (1, 1), "has no `replicas`"),
        ("name: a\nreplicas: 3\nexpire_after: soon\n", (3, 15), "not a duration"),
        ("name: a\nreplicas: 3\nrepair: {bandwidth: fast}\n", (3, 21), "not a size"),
        ("name: a\nreplicas: 3\nmatch: {labels: [zone in eu]}\n", (3, 18), "list in brackets"),
        ("name: a\nreplicas: 3\nmatch: {owner: yes}\n", (3, 16), "got a boolean"),
        ("name: a\nreplicas: 3\npreferences: [{tag: ssd}]\n", (3, 15), "needs a `weight`"),
        ("name: a\nreplicas: 3\npreferences: [{weight: 2}]\n", (3, 15), "exactly one"),
        ("name: a\nreplicas: 2\nlocality: {near: [], min_local: 1}\n", (3, 18), "is empty"),
        ("name: a\nreplicas: 3\nnmae: x\n", (3, 1), "unknown key 'nmae'"),
        ("name: a\nreplicas: 3\nreplicas: 4\n", (3, 1), "duplicate key 'replicas'"),
        ("name: a\nreplicas: 3\nspread: !!python/object:os.system x\n", (3, 9), "unsupported"),
        ("name: a\nreplicas: [3\n", (3, 1), "YAML syntax error"),
        ("name: a\n  replicas: 3\n", (2, 11), "YAML syntax error"),
        ("- 1\n", (1, 3), "expected a mapping for a policy"),
        ("42\n", (1, 1), "a document must be a policy"),
    ],
)
def test_single_problems(text: str, where: tuple[int, int], message: str) -> None:
    problem = only(text)
    assert (problem.line, problem.column) == where, problem
    assert message in problem.message, problem
    assert problem.hint, problem


def test_spelling_hints() -> None:
    problem = only("name: a\nreplicas: 3\nspread: {domain: zon}\n")
    assert problem.hint == "did you mean `zone`?"
    problem = only("name: a\nreplicas: 3\nrepliacs: 3\n")
    assert "did you mean `replicas`" in problem.hint


def test_min_local_cannot_exceed_replicas() -> None:
    problem = only(
        "consumers: {shop: {zone: z}}\n---\nname: a\nreplicas: 2\n"
        "locality: {near: shop, min_local: 3}\n"
    )
    assert (problem.line, problem.column) == (5, 35)
    assert "more than replicas.max" in problem.message


def test_duplicate_names_and_two_defaults_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: one\nreplicas: 3\n")
    (tmp_path / "b.yaml").write_text("name: two\nreplicas: 2\n---\nname: one\nreplicas: 1\n")
    with pytest.raises(PolicyValidationError) as info:
        load_paths([str(tmp_path)])
    messages = [str(p) for p in info.value.problems]
    assert any(
        m.startswith(f"{tmp_path / 'b.yaml'}:4:7: duplicate policy name 'one'") for m in messages
    ), messages
    assert any("already the default policy" in m for m in messages), messages


def test_a_consumer_declared_twice_differently_is_refused() -> None:
    problem = only(
        "consumers: {shop: {zone: a}}\n---\nconsumers: {shop: {zone: b}}\n---\n"
        "name: a\nreplicas: 1\nlocality: {near: shop}\n"
    )
    assert (problem.line, problem.column) == (3, 13)
    assert "declared again with different labels" in problem.message


def test_recursive_alias_and_alias_bombs_are_problems_not_crashes() -> None:
    assert "refers to itself" in only("name: a\nreplicas: 3\nmatch: &m {name: [*m]}\n").message
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefg":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [{', '.join(['*' + previous] * 10)}]\n"
    found = problems_of(bomb)
    assert any("expands to more than" in p.message for p in found)


def test_syntax_error_still_reports_problems_of_earlier_documents() -> None:
    found = problems_of("name: a\nreplicas: x\n---\nname: b\nreplicas: [\n")
    assert [p.line for p in found] == [2, 6]


def test_empty_documents_and_list_form() -> None:
    loaded = load_text(
        "---\n- {name: a, replicas: 1, match: {owner: x}}\n- {name: b, replicas: 2}\n---\n"
    )
    assert [p.name for p in loaded.policy_set.policies] == ["a", "b"]
    assert loaded.sources["a"].text == "{name: a, replicas: 1, match: {owner: x}}\n"


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyValidationError) as info:
        load_paths([str(tmp_path)])
    assert "no .yaml or .yml files" in str(info.value)
    with pytest.raises(OSError):
        load_paths([str(tmp_path / "missing.yaml")])


def test_the_pure_policy_modules_do_not_load_nats() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cim_place.policies\nassert not any(m.startswith('nats') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
