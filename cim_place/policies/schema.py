"""The JSON Schema (draft 2020-12) of one document of a policy file, for editors and CI.

It mirrors the rules of :mod:`cim_place.policies.validate` for shape and types; the checks that
span values (min <= max, declared consumers, unique names, one default) only the validator does.
"""

from __future__ import annotations

from typing import Any

from cim_place.policies.demand import FOLLOW_VALUES, MAX_EXTRA, MAX_MIN_READS
from cim_place.policies.model import FAILURE_DOMAINS
from cim_place.policies.policy_limits import MAX_PRIORITY, MAX_REPLICAS, MAX_WEIGHT, NAME_RE

SCHEMA_ID = "https://cim-place.dev/schemas/policy-file.json"

_NAME = {"type": "string", "pattern": NAME_RE.pattern}
_DURATION = {
    "description": "whole seconds, or a duration such as 90s, 15m, 12h, 7d, 2w, 1h30m",
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+|(\d+[wdhms])+)\s*$"},
    ],
}
_SIZE_UNIT = r"([bB]|[kKmMgGtT]([bB]|[iI][bB])?)?"
_SIZE = {
    "description": "bytes, or a size such as 500KB, 10MiB, 1.5GB",
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": rf"^\s*\d+(\.\d+)?\s*{_SIZE_UNIT}\s*$"},
    ],
}
_BANDWIDTH = {
    "description": "bytes per second, or a size such as 50MiB (optionally 50MiB/s)",
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": rf"^\s*\d+(\.\d+)?\s*{_SIZE_UNIT}(/s)?\s*$"},
    ],
}


_POSITIVE_DURATION = {
    "description": _DURATION["description"],
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": r"^\s*(0*[1-9]\d*|(\d+[wdhms])+)\s*$"},
    ],
}
_BUDGET = {
    "description": "a share of each node's capacity (20%) or a size per node (500GiB)",
    "type": "string",
    "pattern": rf"^\s*(\d+(\.\d+)?\s*%|\d+(\.\d+)?\s*{_SIZE_UNIT})\s*$",
}


def _one_or_many(item: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "anyOf": [item, {"type": "array", "items": item, "minItems": 1}],
    }


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": False, **extra}


def policy_file_schema() -> dict[str, Any]:
    """The schema of one YAML document of a policy file."""
    label_value = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]}
    label_requirements = {
        "description": (
            'a list such as ["zone in [eu-1, eu-2]", "tier = gold", "!scratch"], '
            "or a mapping {label: value} / {label: [values]}"
        ),
        "anyOf": [
            {
                "type": "array",
                "items": {"type": "string", "pattern": r"^\s*!?\s*[A-Za-z0-9][A-Za-z0-9_./-]*"},
            },
            {
                "type": "object",
                "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_./-]*$"},
                "additionalProperties": {
                    "anyOf": [label_value, {"type": "array", "items": label_value, "minItems": 1}]
                },
            },
        ],
    }
    replicas_count = {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS}
    policy = _object(
        {
            "name": {**_NAME, "description": "unique name of the policy"},
            "description": {"type": "string"},
            "priority": {
                "type": "integer",
                "minimum": -MAX_PRIORITY,
                "maximum": MAX_PRIORITY,
                "description": "the highest-priority matching policy applies",
            },
            "match": _object(
                {
                    "name": _one_or_many({"type": "string", "minLength": 1}, "name globs"),
                    "owner": _one_or_many({"type": "string", "minLength": 1}, "owners"),
                    "labels": label_requirements,
                    "size": _object({"min": _SIZE, "max": _SIZE}, minProperties=1),
                    "bucket": _one_or_many({"type": "string", "minLength": 1}, "S3 buckets"),
                    "content_type": _one_or_many(
                        {"type": "string", "minLength": 1}, "content type globs, e.g. image/*"
                    ),
                },
                minProperties=1,
                description="selectors over objects (all must hold); omit for the default policy",
            ),
            "replicas": {
                "description": "a number of copies, or {min, max}",
                "anyOf": [
                    replicas_count,
                    _object({"min": replicas_count, "max": replicas_count}, minProperties=1),
                ],
            },
            "spread": {
                "anyOf": [
                    {"enum": list(FAILURE_DOMAINS)},
                    _object(
                        {
                            "domain": {"enum": list(FAILURE_DOMAINS)},
                            "max_per_domain": {"type": "integer", "minimum": 1},
                        },
                        required=["domain"],
                    ),
                ]
            },
            "constraints": _object(
                {
                    "tags": _one_or_many({"type": "string", "minLength": 1}, "required tags"),
                    "labels": label_requirements,
                    "exclude_nodes": _one_or_many({"type": "string", "minLength": 1}, "node ids"),
                },
                description="hard requirements on the nodes that may hold a copy",
            ),
            "preferences": {
                "type": "array",
                "items": {
                    **_object(
                        {
                            "tag": {"type": "string", "minLength": 1},
                            "label": {"type": "string", "minLength": 1},
                            "weight": {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT},
                        },
                        required=["weight"],
                    ),
                    "oneOf": [{"required": ["tag"]}, {"required": ["label"]}],
                },
            },
            "locality": _object(
                {
                    "near": _one_or_many(_NAME, "declared consumer names"),
                    "min_local": {"type": "integer", "minimum": 1},
                    "mode": {"enum": ["hard", "soft"]},
                },
                required=["near"],
            ),
            "expire_after": _DURATION,
            "protected": {"type": "boolean"},
            "keep_versions": {"type": "integer", "minimum": 1, "maximum": 64},
            "repair": _object(
                {
                    "grace": _DURATION,
                    "max_concurrent": {"type": "integer", "minimum": 1},
                    "bandwidth": _BANDWIDTH,
                }
            ),
            "demand": _object(
                {
                    "follow": {"enum": list(FOLLOW_VALUES)},
                    "min_reads": {"type": "integer", "minimum": 1, "maximum": MAX_MIN_READS},
                    "window": _POSITIVE_DURATION,
                    "max_extra": {"type": "integer", "minimum": 1, "maximum": MAX_EXTRA},
                    "keep": _POSITIVE_DURATION,
                    "budget": _BUDGET,
                },
                description="extra cached copies where the content is read (docs/DEMAND.md)",
            ),
        },
        required=["name", "replicas"],
    )
    consumers = {
        "type": "object",
        "description": (
            "consumer name -> the node labels it runs at; `service: IDENTITY` locates it by "
            "the reads of that service"
        ),
        "propertyNames": _NAME,
        "additionalProperties": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_./-]*$"},
            "additionalProperties": label_value,
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "cim-place policy file (one YAML document)",
        "$defs": {"policy": policy, "consumers": consumers},
        "anyOf": [
            {"$ref": "#/$defs/policy"},
            {"type": "array", "items": {"$ref": "#/$defs/policy"}},
            _object(
                {
                    "policies": {"type": "array", "items": {"$ref": "#/$defs/policy"}},
                    "consumers": {"$ref": "#/$defs/consumers"},
                },
                minProperties=1,
            ),
            {"type": "null"},
        ],
    }
