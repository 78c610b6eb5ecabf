"""A CPU quota for one bench process: its own cgroup, so that a machine with few cores can show
how a rate scales when every process gets the same CPU budget (``controller_scale.py
--shards-ingest --cpu-quota``).

On a 2-core machine one controller process already keeps a core busy, and two of them plus the
hub saturate both cores, so the machine, not the design, bounds what two shards show. Giving each
controller process the same fraction of a core (the cgroup's CFS quota) emulates a machine with a
core per process at that fraction of the speed: the hub stays unconstrained, as it would run on
its own cores. Needs root and a cgroup ``cpu`` controller (v1 at ``/sys/fs/cgroup/cpu``, or v2 with
``cpu.max``); the cgroup is removed when the process has exited.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["CpuQuota"]

_PERIOD_US = 100_000
_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


class CpuQuota:
    """A cgroup limited to ``cores`` CPUs; :meth:`wrap` makes a command start inside it."""

    def __init__(self, cores: float, name: str) -> None:
        if cores <= 0:
            raise SystemExit(f"--cpu-quota must be above 0, got {cores}")
        self.cores = cores
        quota = str(max(1000, int(cores * _PERIOD_US)))
        if (_V1 / "cpu.cfs_quota_us").exists():
            self.path = _V1 / name
            files = {"cpu.cfs_period_us": str(_PERIOD_US), "cpu.cfs_quota_us": quota}
        elif (_V2 / "cpu.max").exists() or "cpu" in _read(_V2 / "cgroup.controllers"):
            self.path = _V2 / name
            files = {"cpu.max": f"{quota} {_PERIOD_US}"}
        else:
            raise SystemExit("--cpu-quota needs a cgroup cpu controller (none found)")
        try:
            self.path.mkdir(exist_ok=True)
            for file, value in files.items():
                (self.path / file).write_text(value)
        except OSError as error:
            raise SystemExit(
                f"--cpu-quota: cannot set up cgroup {self.path}: {error} (root?)"
            ) from error

    def wrap(self, command: list[str]) -> list[str]:
        """``command``, moved into this cgroup before it execs (so it never runs outside)."""
        procs = str(self.path / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *command]

    def remove(self) -> None:
        """Remove the cgroup (its processes must have exited; retried briefly)."""
        for _ in range(50):
            try:
                os.rmdir(self.path)
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
            else:
                return


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
