"""The fault-injection suite (docs/RELIABILITY.md): a seeded schedule of kills (agents, leaf
servers, the leading controller, a member of the 3-server hub), link cuts, slow links, damage on
disk, a full volume, malformed and forged events against a local domain of supervised processes,
while adds, gets and policy changes run; every invariant of cim_place.local.chaos must hold.

``make test`` runs a short run (``CHAOS_SECONDS``, default 75); ``make chaos`` a long one.
``CHAOS_SEED`` replays a schedule (default: a new seed, printed)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cim_place.local.chaos import Chaos
from cim_place.local.chaos_schedule import DEFAULT_FAULTS, Fault

pytestmark = [pytest.mark.nats, pytest.mark.chaos, pytest.mark.timeout(1800)]


def _seed() -> int:
    given = os.environ.get("CHAOS_SEED")
    return int(given) if given else random.SystemRandom().randrange(1, 1_000_000)


async def test_invariants_hold_under_faults(tmp_path: Path) -> None:
    seconds = float(os.environ.get("CHAOS_SECONDS", "75"))
    chaos = Chaos(tmp_path, seed=_seed(), seconds=seconds, kinds=DEFAULT_FAULTS)
    report = await chaos.run()
    assert report.adds_acknowledged > 0, report.summary()
    assert sum(report.injected.values()) > 0, report.summary()
    assert not report.violations(), report.summary() + "\n" + "\n".join(report.violations())


async def test_the_suite_notices_a_broken_invariant(tmp_path: Path) -> None:
    """Deleting every copy of an acknowledged object must be reported as a lost object."""
    chaos = Chaos(
        tmp_path,
        seed=7,
        seconds=20,
        kinds=("kill-agent",),
        max_adds=6,
        converge_bound=30,
        extra=[Fault(15.0, "destroy-object", "all")],
    )
    report = await chaos.run()
    assert report.injected.get("destroy-object") == 1, report.summary()
    problems = report.violations()
    assert any("lost" in p for p in problems), report.summary()
