"""What a chaos run found: the acknowledged objects it tracks and its report of the invariants.

This module owns :class:`Acked` and :class:`Report`, whose ``violations()`` names every invariant
of :mod:`cim_place.local.chaos` that broke (empty: all held) and whose ``summary()`` is what a run
prints at its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cim_place.local.chaos_schedule import Fault

__all__ = ["Acked", "Report"]


@dataclass
class Acked:
    cid: str
    digest: str
    size: int


@dataclass
class Report:
    seed: int
    faults: list[Fault]
    injected: dict[str, int] = field(default_factory=dict)
    adds_acknowledged: int = 0
    adds_failed: int = 0
    gets_ok: int = 0
    gets_failed: int = 0
    wrong_reads: int = 0
    lost: list[str] = field(default_factory=list)
    overcounted: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    converge_seconds: float | None = None
    converge_bound: float = 0.0
    since_last_fault: float | None = None
    """Seconds from the end of the last fault (a healed one: its healing) to convergence."""
    left_behind: list[int] = field(default_factory=list)
    believed: list[str] = field(default_factory=list)
    """Forged claims of a copy that the domain still counted at the end."""
    rejected_events: int = 0
    down: list[str] = field(default_factory=list)
    """Supervised processes not running at the end (the supervisor failed to restart them)."""
    notes: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        problems = []
        if self.wrong_reads:
            problems.append(f"{self.wrong_reads} get(s) returned wrong bytes")
        if self.lost:
            problems.append(f"acknowledged object(s) lost or not placed: {', '.join(self.lost)}")
        if self.overcounted:
            problems.append(f"more verified copies reported than exist: {self.overcounted}")
        if self.hangs:
            problems.append(f"operations that hung past their timeout: {self.hangs}")
        if self.converge_seconds is None:
            problems.append(f"did not converge within {self.converge_bound:.0f} s")
        if self.believed:
            problems.append(f"forged copies still believed at the end: {self.believed}")
        if self.down:
            problems.append(f"processes not running again at the end: {', '.join(self.down)}")
        if self.left_behind:
            problems.append(f"processes left behind: {self.left_behind}")
        return problems

    def summary(self) -> str:
        injected = ", ".join(f"{k} {v}" for k, v in sorted(self.injected.items())) or "none"
        converged = (
            f"{self.converge_seconds:.1f} s" if self.converge_seconds is not None else "never"
        )
        since = f"{self.since_last_fault:.1f} s" if self.since_last_fault is not None else "never"
        lines = [
            f"chaos seed {self.seed}: faults injected: {injected}",
            f"adds acknowledged {self.adds_acknowledged}, failed cleanly {self.adds_failed}; "
            f"gets ok {self.gets_ok}, failed cleanly {self.gets_failed}, wrong {self.wrong_reads}",
            f"events the controller rejected {self.rejected_events}; "
            f"objects lost {len(self.lost)}; converged {converged} after the workload stopped "
            f"(bound {self.converge_bound:.0f} s), {since} after the last fault ended",
            *self.notes,
        ]
        return "\n".join(lines)
