"""The planner (a pure function of object, policy and node map) and the reconciler. No NATS here."""

from cim_place.placement.batch import plan_batch
from cim_place.placement.model import (
    LabelRequirement,
    Locality,
    NodeMap,
    PlacedObject,
    Placement,
    PlacementRule,
    Preference,
    Reason,
    Verdict,
    Volume,
    VolumeState,
)
from cim_place.placement.planner import plan

__all__ = [
    "LabelRequirement",
    "Locality",
    "NodeMap",
    "PlacedObject",
    "Placement",
    "PlacementRule",
    "Preference",
    "Reason",
    "Verdict",
    "Volume",
    "VolumeState",
    "plan",
    "plan_batch",
]
