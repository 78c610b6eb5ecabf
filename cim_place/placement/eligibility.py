"""Steps 1 and 2 of the planner (:mod:`cim_place.placement.planner`): which volumes a rule
allows, and their straw2 scores for an object.

:class:`Eligibility` is what a rule leaves of a node map (the volumes passing every hard
constraint, the refusal of every other, their seeds, weights, usage and failure domains),
computed once and shared by every plan against that rule and map. :func:`straw2_draws` scores
objects against volumes; the scalar walk and the batch planner (:mod:`cim_place.placement.batch`)
both call it, so they see bit-identical scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cim_place.placement.model import (
    DomainKey,
    NodeMap,
    PlacementRule,
    SpreadLevel,
    Verdict,
    Volume,
    VolumeId,
    VolumeState,
)
from cim_place.placement.shares import expected_copies

__all__ = ["F64", "U64", "Eligibility", "straw2_draws"]

U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ONE_BITS = np.uint64(0x3FF0000000000000)  # the float64 exponent bits of [1, 2)
_ONE_MINUS_HALF_ULP = 1.0 - 2.0**-53


def straw2_draws(
    keys: U64, seeds: U64, weights: F64, *, work: tuple[U64, U64] | None = None
) -> F64:
    """Straw2 draws of ``keys`` (objects) against volumes: a ``len(keys) x len(seeds)`` matrix.

    The larger draw wins. This one function serves the scalar and the batch planner, so both see
    bit-identical scores (the same numpy kernels on contiguous float64 arrays). ``work``: two
    uint64 buffers of the result's shape to compute in (the result is a float64 view of the
    first); reusing them across batches saves allocating and faulting in fresh pages.
    """
    shape = (len(keys), len(seeds))
    if work is None:
        z, t = np.empty(shape, dtype=np.uint64), np.empty(shape, dtype=np.uint64)
    else:
        z, t = work
    np.bitwise_xor(keys[:, None], seeds[None, :], out=z)
    # splitmix64 finaliser: every input bit affects every output bit.
    for shift, multiplier in ((30, _MIX1), (27, _MIX2)):
        np.right_shift(z, np.uint64(shift), out=t)
        z ^= t
        z *= multiplier
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    # u = (top 52 bits + 0.5) / 2**52, in (0, 1), never 0 or 1, so ln(u) is finite and < 0.
    # Built as the float 1 + m/2**52 from its bits, minus (1 - 2**-53): Sterbenz's lemma makes
    # the subtraction exact, and it avoids the slow uint64 -> float64 conversion.
    z >>= np.uint64(12)
    z |= _ONE_BITS
    u = z.view(np.float64)
    u -= _ONE_MINUS_HALF_ULP
    np.log(u, out=u)
    u /= weights[None, :]
    return u


@dataclass(frozen=True, slots=True)
class Eligibility:
    """What a rule leaves of a node map, computed once and shared by many plans.

    ``eligible`` are the volumes passing every hard constraint, in id order; the arrays are
    aligned with it. ``refused`` holds the hard-constraint verdict of every other volume.
    """

    rule: PlacementRule
    node_map: NodeMap
    eligible: tuple[Volume, ...]
    refused: dict[VolumeId, tuple[Verdict, str]]
    seeds: U64
    weights: F64
    """Rendezvous weights: capacity weight times matching preference factors."""
    used: F64
    free: npt.NDArray[np.int64]
    cap_factor: F64 | None
    """``(1 + eps) * s_v / sum(s)`` per volume, ``s`` the expected copies per object under the
    rule's spread (:mod:`placement.shares`): the load cap is ``cap_factor * total bytes``."""
    used_total: int
    domains: dict[SpreadLevel, list[DomainKey]]
    """Failure domain of each eligible volume at each level."""
    position: dict[VolumeId, int]
    """Each eligible volume's index in ``eligible`` (and the arrays)."""

    @classmethod
    def of(cls, rule: PlacementRule, node_map: NodeMap) -> Eligibility:
        eligible: list[Volume] = []
        refused: dict[VolumeId, tuple[Verdict, str]] = {}
        for volume in node_map.volumes:
            verdict = _hard_refusal(volume, rule)
            if verdict is None:
                eligible.append(volume)
            else:
                refused[volume.id] = verdict
        cap_factor: F64 | None = None
        if rule.load_cap is not None and eligible:
            shares = expected_copies(rule, eligible)
            total_share = float(shares.sum())
            if total_share > 0:
                cap_factor = (1.0 + rule.load_cap) * (shares / total_share)
        return cls(
            rule=rule,
            node_map=node_map,
            eligible=tuple(eligible),
            refused=refused,
            seeds=np.array([v.seed for v in eligible], dtype=np.uint64),
            weights=np.array(
                [v.base_weight * rule.preference_factor(v) for v in eligible], dtype=np.float64
            ),
            used=np.array([float(v.used) for v in eligible], dtype=np.float64),
            free=np.array([v.free for v in eligible], dtype=np.int64),
            cap_factor=cap_factor,
            used_total=sum(v.used for v in eligible),
            domains={level: [v.domain(level) for v in eligible] for level in SpreadLevel},
            position={v.id: i for i, v in enumerate(eligible)},
        )

    def load_total(self, size: int) -> float:
        """The bytes the fair shares divide: what is stored plus this object's replicas."""
        return float(self.used_total + size * self.rule.replicas)


def _hard_refusal(volume: Volume, rule: PlacementRule) -> tuple[Verdict, str] | None:
    if volume.node in rule.excluded_nodes:
        return (Verdict.EXCLUDED, f"node {volume.node} is excluded by the policy")
    if volume.state is VolumeState.DOWN:
        return (Verdict.DOWN, "")
    if volume.state is VolumeState.DRAINING:
        return (Verdict.DRAINING, "")
    missing = rule.required_tags - volume.tags
    if missing:
        return (Verdict.CONSTRAINT, f"missing tag {', '.join(sorted(missing))}")
    for requirement in rule.requirements:
        if not requirement.matches(volume):
            return (Verdict.CONSTRAINT, f"needs {requirement}")
    if volume.base_weight <= 0:
        return (Verdict.NO_WEIGHT, "")
    return None
