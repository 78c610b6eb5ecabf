"""The published JSON Schema: a valid draft 2020-12 schema that accepts the example files and
the canonical form, and rejects unknown keys and wrong types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cim_place.policies.codec import policy_to_dict
from cim_place.policies.schema import policy_file_schema
from cim_place.policies.validate import load_paths

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "policies"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = policy_file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_there_are_example_files() -> None:
    assert {f.name for f in EXAMPLE_FILES} >= {
        "default.yaml",
        "documents.yaml",
        "media.yaml",
        "scratch.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_files_match_the_schema(
    validator: jsonschema.protocols.Validator, path: Path
) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        errors = [e.message for e in validator.iter_errors(document)]
        assert not errors, errors


def test_canonical_form_matches_the_schema(validator: jsonschema.protocols.Validator) -> None:
    for policy in load_paths([str(EXAMPLES)]).policy_set.policies:
        validator.validate(policy_to_dict(policy))


@pytest.mark.parametrize(
    "document",
    [
        {"name": "a", "replicas": 3, "colour": "blue"},
        {"name": "a", "replicas": 3, "match": {"nmae": "x"}},
        {"name": "a", "replicas": 3, "spread": {"domain": "zone", "extra": 1}},
        {"name": "a", "replicas": 3, "repair": {"grace": "1h", "retries": 3}},
        {"name": "a", "replicas": 3, "locality": {"near": "shop", "far": "x"}},
        {"name": "a", "replicas": 3, "constraints": {"tag": ["ssd"]}},
        {"policies": [], "consumers": {}, "other": 1},
        [{"name": "a", "replicas": 3, "unknown": True}],
    ],
)
def test_schema_rejects_unknown_keys(
    validator: jsonschema.protocols.Validator, document: Any
) -> None:
    assert not validator.is_valid(document)


@pytest.mark.parametrize(
    "document",
    [
        {"name": "a", "replicas": "three"},
        {"name": "a", "replicas": 3, "spread": "rack"},
        {"name": "A B", "replicas": 3},
        {"replicas": 3},
        {"name": "a", "replicas": 3, "expire_after": "soon"},
        {"name": "a", "replicas": 3, "locality": {"near": "x", "mode": "maybe"}},
        {"name": "a", "replicas": 3, "preferences": [{"tag": "ssd"}]},
        {"name": "a", "replicas": 3, "preferences": [{"tag": "ssd", "label": "x", "weight": 1}]},
    ],
)
def test_schema_rejects_wrong_values(
    validator: jsonschema.protocols.Validator, document: Any
) -> None:
    assert not validator.is_valid(document)
