"""Label requirements as operators write them: ``zone in [eu-1, eu-2]``, ``tier = gold``,
``host not in [web1]``, ``ssd`` (exists), ``!scratch`` (absent); or the mapping shorthand
``{zone: eu-1}`` / ``{zone: [eu-1, eu-2]}``.

The string form is also the canonical form stored in KV: ``str(requirement)`` parses back to the
same requirement.
"""

from __future__ import annotations

import re

from cim_place.policies.model import LabelOp, LabelRequirement

LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
_EXPR_RE = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][A-Za-z0-9_./-]*)\s*"
    r"(?:(?P<op>not\s+in\b|in\b|!=|==|=)\s*(?P<rest>.*?))?\s*$"
)
_FORBIDDEN_IN_LIST = re.compile(r"[,\[\]]")

EXPRESSION_HINT = (
    "write `key = value`, `key != value`, `key in [a, b]`, `key not in [a, b]`, "
    "`key` (exists) or `!key` (absent)"
)


def parse_requirement(text: str) -> LabelRequirement:
    """Parse one requirement; raises ValueError with a message fit for a problem report."""
    m = _EXPR_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a label requirement")
    key, op, rest = m.group("key"), m.group("op"), m.group("rest")
    if m.group("neg"):
        if op:
            raise ValueError(f"{text!r}: `!` only goes with a bare key (label absent)")
        return LabelRequirement(key, "not exists")
    if not op:
        return LabelRequirement(key, "exists")
    op = " ".join(op.split())
    if op in ("in", "not in"):
        if not (rest.startswith("[") and rest.endswith("]")):
            raise ValueError(f"{text!r}: `{op}` takes a list in brackets, e.g. [a, b]")
        values = tuple(v.strip() for v in rest[1:-1].split(","))
        if not values or any(not v or _FORBIDDEN_IN_LIST.search(v) for v in values):
            raise ValueError(f"{text!r}: the list must hold non-empty values separated by commas")
        checked_op: LabelOp = "in" if op == "in" else "not in"
        return LabelRequirement(key, checked_op, _unique(values))
    if not rest or rest.startswith("["):
        raise ValueError(f"{text!r}: `{op}` takes one value (use `in [..]` for a list)")
    return LabelRequirement(key, "!=" if op == "!=" else "=", (rest,))


def requirement_from_mapping(key: str, value: object) -> LabelRequirement:
    """``{key: value}`` means equals, ``{key: [a, b]}`` means in; ValueError otherwise."""
    if not LABEL_KEY_RE.match(key):
        raise ValueError(f"{key!r} is not a label key (letters, digits, _ . / -)")
    if isinstance(value, list):
        values = tuple(_label_value(v) for v in value)
        if not values:
            raise ValueError(f"label {key!r}: the list of allowed values is empty")
        if any(_FORBIDDEN_IN_LIST.search(v) for v in values):
            raise ValueError(f"label {key!r}: list values cannot contain , [ or ]")
        return LabelRequirement(key, "in", _unique(values))
    return LabelRequirement(key, "=", (_label_value(value),))


def _label_value(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(
            f"a label value must be a string, got {value!r} "
            '(quote yes/no/on/off/true/false; for `exists` use the list form ["key"])'
        )
    text = str(value).strip()
    if not text:
        raise ValueError("a label value cannot be empty")
    if text.startswith("["):
        raise ValueError(f"a label value cannot start with [, got {text!r}")
    return text


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))
