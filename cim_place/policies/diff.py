"""What applying a set of policies would change: added, changed and removed policies and
consumers, with the changed fields of each (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cim_place.policies.codec import consumers_to_dict, policy_to_dict
from cim_place.policies.model import PolicySet


@dataclass(frozen=True, slots=True)
class FieldChange:
    path: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class SetDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: dict[str, tuple[FieldChange, ...]] = field(default_factory=dict)
    consumers_added: tuple[str, ...] = ()
    consumers_removed: tuple[str, ...] = ()
    consumers_changed: dict[str, tuple[FieldChange, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.changed
            or self.consumers_added
            or self.consumers_removed
            or self.consumers_changed
        )

    def to_dict(self) -> dict[str, Any]:
        def changes(c: dict[str, tuple[FieldChange, ...]]) -> dict[str, Any]:
            return {
                k: [{"path": f.path, "old": f.old, "new": f.new} for f in v] for k, v in c.items()
            }

        return {
            "policies": {
                "added": list(self.added),
                "removed": list(self.removed),
                "changed": changes(self.changed),
            },
            "consumers": {
                "added": list(self.consumers_added),
                "removed": list(self.consumers_removed),
                "changed": changes(self.consumers_changed),
            },
        }

    def render(self) -> str:
        if self.empty:
            return "no changes"
        lines: list[str] = []
        for what, added, removed, changed in (
            ("policy", self.added, self.removed, self.changed),
            ("consumer", self.consumers_added, self.consumers_removed, self.consumers_changed),
        ):
            lines.extend(f"+ {what} {name}" for name in added)
            for name, fields in changed.items():
                lines.append(f"~ {what} {name}")
                lines.extend(f"    {f.path}: {_show(f.old)} -> {_show(f.new)}" for f in fields)
            lines.extend(f"- {what} {name}" for name in removed)
        return "\n".join(lines)


def diff_sets(old: PolicySet, new: PolicySet) -> SetDiff:
    """What changes when ``new`` replaces ``old``."""
    old_p = {p.name: policy_to_dict(p) for p in old.policies}
    new_p = {p.name: policy_to_dict(p) for p in new.policies}
    old_c = consumers_to_dict(old.consumers)
    new_c = consumers_to_dict(new.consumers)
    return SetDiff(
        added=tuple(sorted(new_p.keys() - old_p.keys())),
        removed=tuple(sorted(old_p.keys() - new_p.keys())),
        changed=_changed(old_p, new_p),
        consumers_added=tuple(sorted(new_c.keys() - old_c.keys())),
        consumers_removed=tuple(sorted(old_c.keys() - new_c.keys())),
        consumers_changed=_changed(old_c, new_c),
    )


def _changed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[FieldChange, ...]]:
    out: dict[str, tuple[FieldChange, ...]] = {}
    for name in sorted(old.keys() & new.keys()):
        fields = tuple(_field_changes(old[name], new[name], ""))
        if fields:
            out[name] = fields
    return out


def _field_changes(old: Any, new: Any, path: str) -> list[FieldChange]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[FieldChange] = []
        for key in sorted(old.keys() | new.keys()):
            sub = f"{path}.{key}" if path else str(key)
            found.extend(_field_changes(old.get(key), new.get(key), sub))
        return found
    return [] if old == new else [FieldChange(path, old, new)]


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value)
