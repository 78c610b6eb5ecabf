"""An object's status: its fingerprint changes with every field that its encoding writes."""

from __future__ import annotations

from dataclasses import fields, replace

from cim_place.placement.status import Condition, Location, ObjectStatus

BASE = ObjectStatus(
    cid="bafkreiexample",
    state="placed",
    locations=(Location("n1", "v1", "z1"), Location("n2", "v1", "z2", "fetching")),
    desired=2,
    policy="two",
    name="object-1",
    owner="alice",
    size=1024,
    metadata={"team": "web", "tier": "gold"},
    conditions=(Condition("Placed", True, "DesiredMet", "2 of 2 copies", 1.0),),
    updated_at=1.0,
)
CHANGED: dict[str, object] = {
    "cid": "bafkreiother",
    "state": "degraded",
    "locations": (Location("n1", "v1", "z1"), Location("n2", "v1", "z2", "pinned")),
    "desired": 3,
    "policy": "three",
    "name": None,
    "owner": "bob",
    "size": 1025,
    "metadata": {"team": "web", "tier": "silver"},
    "conditions": (Condition("Placed", False, "DesiredMet", "2 of 2 copies", 1.0),),
    "updated_at": 2.0,
}


def test_a_change_of_any_field_changes_the_fingerprint() -> None:
    assert set(CHANGED) == {f.name for f in fields(ObjectStatus)}  # every field is tried
    for name, value in CHANGED.items():
        other = replace(BASE, **{name: value})  # type: ignore[arg-type]
        assert other.encode() != BASE.encode()
        assert other.fingerprint() != BASE.fingerprint(), name


def test_equal_statuses_have_one_fingerprint() -> None:
    same = replace(BASE, metadata={"tier": "gold", "team": "web"})  # other insertion order
    assert same.encode() == BASE.encode() and same.fingerprint() == BASE.fingerprint()
