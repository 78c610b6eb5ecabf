"""The faults of a chaos run: their kinds and the seeded schedule that says when each strikes.

This module owns the fault kinds (``DEFAULT_FAULTS`` and their groups), :class:`Fault` and
:func:`schedule`, deterministic for a seed so a failing run is replayed with the same seed. The
run that injects them is :mod:`cim_place.local.chaos`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "DEFAULT_FAULTS",
    "DISK",
    "HEALING",
    "KILLS",
    "LINKS",
    "MESSAGES",
    "Fault",
    "schedule",
]

KILLS = ("kill-agent", "kill-controller", "kill-leaf-server", "kill-hub")
LINKS = ("cut-link", "slow-link")
DISK = ("corrupt-block", "delete-block", "full-volume")
MESSAGES = ("malformed-event", "forged-event")
HEALING = (*LINKS, "full-volume")
"""Faults that last a while and then heal."""
DEFAULT_FAULTS = (*KILLS, *LINKS, *DISK, *MESSAGES)
"""What a default run injects (with a 3-server hub, ``kill-hub`` kills one member)."""


@dataclass(frozen=True, slots=True)
class Fault:
    at: float
    """Seconds after the start of the run."""
    kind: str
    target: str
    """A node id, ``controller`` or ``hub``."""
    lasts: float = 0.0
    """For faults that heal (link cuts, slow links): how long."""

    def __str__(self) -> str:
        heal = f" for {self.lasts:.1f}s" if self.lasts else ""
        return f"t+{self.at:6.1f}s {self.kind:<17} {self.target}{heal}"


def schedule(
    seed: int,
    seconds: float,
    nodes: list[str],
    kinds: tuple[str, ...],
    every: float = 6.0,
    hubs: list[str] | None = None,
) -> list[Fault]:
    """The faults of a run: one every ``every`` seconds on average, all within the first 70%
    of the run so the rest shows convergence. Deterministic for a seed. ``hubs``: the members
    of a clustered hub (``kill-hub`` picks one); None or one: the hub server."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    at = rng.uniform(2.0, every)
    while at < seconds * 0.7:
        kind = rng.choice(kinds)
        if kind == "kill-controller":
            target = "controller"
        elif kind == "kill-hub":
            target = rng.choice(hubs) if hubs and len(hubs) > 1 else "hub"
        else:
            target = rng.choice(nodes)
        lasts = round(rng.uniform(2.0, 8.0), 1) if kind in HEALING else 0.0
        if kind == "full-volume":
            lasts *= 2  # it includes two agent restarts
        faults.append(Fault(round(at, 1), kind, target, lasts))
        at += rng.expovariate(1.0 / every)
    return faults
