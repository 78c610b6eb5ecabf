"""Fault injection on a local domain, with the invariants a replication manager must keep.

A run starts a :class:`~cim_place.local.domain.LocalDomain` (every part a supervised process,
each leaf linked to the hub through a cuttable proxy), drives a workload through the real CLI
(adds of random files on random nodes, gets of acknowledged objects, policy changes), and injects
faults from a seeded schedule that is printed first, so a failing run is replayed with the same
seed. Invariants are checked while it runs and at the end:

1. every add either succeeds or fails with an error within its timeout (no hang);
2. a get never returns wrong bytes (it may fail while faults last);
3. no acknowledged object is lost: after the faults stop, every one converges to ``placed``
   within the printed bound and reads back identical;
4. no object reports more verified copies than the volumes really hold (checked on disk, once
   the scrub had time to find damage injected on disk);
5. no forged claim of a copy counts once the controller's inventory check ran;
6. no process is left behind once the domain stops;
7. every process a fault killed runs again at the end (the supervisor restarted it).

The faults beyond signals and link cuts live in :mod:`cim_place.local.chaos_faults`, their kinds
and schedule in :mod:`cim_place.local.chaos_schedule`, the report in
:mod:`cim_place.local.chaos_report`, the checks at the end of a run in
:mod:`cim_place.local.chaos_checks`.

Bounded in time and count (``seconds``, ``max_adds``); every server binds to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import HUB_DOMAIN
from cim_place.cluster.state.lease import read_leader
from cim_place.local import chaos_faults as faults
from cim_place.local.chaos_checks import RunChecks
from cim_place.local.chaos_report import Acked, Report
from cim_place.local.chaos_schedule import DEFAULT_FAULTS, DISK, LINKS, Fault, schedule
from cim_place.local.domain import CONTROLLER_IDENTITY, LocalDomain
from cim_place.local.servers import NatsServer
from cim_place.objectstore import cid as cids

SCRUB = {"interval": "20s", "rate": "200MiB/s"}
"""The agents' scrub in a run: frequent, so damage on disk is found while the run lasts."""
INVENTORY = 10.0
"""Seconds between the agents' inventory digests: a forged claim is caught within a few."""

CLI = (sys.executable, "-m", "cim_place.cli")
ADD_TIMEOUT = 90.0
GET_TIMEOUT = 90.0


async def _run_cli(
    *args: str, cwd: Path, timeout: float, server: str | None = None
) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr); exit code None when it did not finish within ``timeout``."""
    env = dict(os.environ)
    if server is not None:
        env["CIM_PLACE_SERVER"] = server
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None, "", ""
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


class Chaos(RunChecks):
    """One run. ``await run()`` returns its :class:`Report`; ``report.violations()`` says what
    broke (empty: every invariant held)."""

    def __init__(
        self,
        directory: Path,
        *,
        seed: int,
        seconds: float,
        leaves: int = 5,
        zones: int = 3,
        kinds: tuple[str, ...] = DEFAULT_FAULTS,
        max_adds: int = 200,
        converge_bound: float = 240.0,
        extra: list[Fault] | None = None,
        hub_servers: int = 3,
        say: Callable[[str], None] = print,
    ) -> None:
        self.directory = directory
        self.work = directory / "work"
        self.seed = seed
        self.seconds = seconds
        self.max_adds = max_adds
        self.say = say
        self.rng = random.Random(seed + 1)
        self.domain = LocalDomain(
            directory / "domain",
            leaves=leaves,
            zones=zones,
            heartbeat=1.0,
            controllers=2,
            hub_servers=hub_servers,
            link_proxies=True,
            scrub=SCRUB,
            inventory=INVENTORY,
        )
        nodes = self.domain.node_ids()
        hubs = [f"hub-{i + 1}" for i in range(hub_servers)] if hub_servers > 1 else None
        faults = schedule(seed, seconds, nodes, kinds, hubs=hubs) + list(extra or [])
        self.report = Report(seed, sorted(faults, key=lambda f: f.at))
        self.report.converge_bound = converge_bound
        self.acked: list[Acked] = []
        self.phantoms: list[str] = []
        self.last_fault_end: float | None = None

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> Report:
        self.work.mkdir(parents=True, exist_ok=True)
        self.say(f"chaos: seed {self.seed}, {self.seconds:.0f} s, schedule:")
        for fault in self.report.faults:
            self.say(f"  {fault}")
        await self.domain.start()
        pids: list[int] = []
        try:
            started = time.monotonic()
            deadline = started + self.seconds
            workload = asyncio.create_task(self._workload(deadline))
            await self._inject(started)
            await workload
            await self._converge()
            await self._check_copies()
            await self._check_forgeries()
            await self._check_running()
            pids = [p["pid"] for p in self.domain.processes() if isinstance(p["pid"], int)]
        finally:
            await self.domain.stop()
        self.report.left_behind = [pid for pid in pids if _alive(pid)]
        self.say(self.report.summary())
        return self.report

    async def _inject(self, started: float) -> None:
        for fault in self.report.faults:
            wait = started + fault.at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self._apply(fault)
            except Exception as exc:
                self.report.notes.append(f"fault {fault} not applied: {exc}")
                continue
            self.report.injected[fault.kind] = self.report.injected.get(fault.kind, 0) + 1
            self.last_fault_end = time.monotonic()

    async def _apply(self, fault: Fault) -> None:
        if fault.kind == "kill-controller":
            await self._kill_leader()
        elif fault.kind.startswith("kill-"):
            self._kill(fault)
        elif fault.kind in LINKS:
            link = self._server(fault.target).link
            if link is None:
                raise RuntimeError("the domain runs without link proxies")
            if fault.kind == "cut-link":
                link.cut()
                await asyncio.sleep(fault.lasts)
                link.restore()
            else:
                link.delay = 0.05
                await asyncio.sleep(fault.lasts)
                link.delay = 0.0
        elif fault.kind == "full-volume":
            await faults.full_volume(self.domain, fault.target, fault.lasts)
        elif fault.kind in DISK:
            self.report.notes.append(
                faults.damage_block(self.domain, fault.target, fault.kind, self.rng)
            )
        elif fault.kind == "malformed-event":
            await faults.malformed_events(self.domain, fault.target)
        elif fault.kind == "forged-event":
            phantom = await faults.forged_events(self.domain, fault.target, self.rng)
            self.phantoms.append(cids.to_str(phantom))
        elif fault.kind == "destroy-object":
            if not self.acked:
                raise RuntimeError("nothing acknowledged yet")
            faults.destroy_object(self.domain, self.acked[0].cid)
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    async def _kill_leader(self) -> None:
        """kill -9 the controller that holds the lease (the first one when none does)."""
        async with connected(self._admin_url()) as nc:
            leader = await read_leader(jetstream(nc, HUB_DOMAIN))
        controllers = [p for p in self.domain.processes() if p["role"] == "controller"]
        index = 0
        if leader is not None and leader.leader_id.startswith(f"{CONTROLLER_IDENTITY}-"):
            index = int(leader.leader_id.rsplit("-", 1)[1]) - 1
        pid = controllers[index]["pid"] if index < len(controllers) else None
        if not isinstance(pid, int):
            raise RuntimeError("no controller process")
        os.kill(pid, signal.SIGKILL)

    def _kill(self, fault: Fault) -> None:
        role = {
            "kill-agent": "agent",
            "kill-leaf-server": "leaf-server",
            "kill-controller": "controller",
            "kill-hub": "hub",
        }[fault.kind]
        for process in self.domain.processes():
            if process["role"] == role and (
                role == "controller"
                or (role == "hub" and fault.target == "hub")
                or process["node"] == fault.target
            ):
                pid = process["pid"]
                if isinstance(pid, int):
                    os.kill(pid, signal.SIGKILL)
                return
        raise RuntimeError(f"no {role} process for {fault.target}")

    def _server(self, node: str) -> NatsServer:
        for entry in self.domain.nodes:
            if entry.node == node:
                return entry.server
        raise RuntimeError(f"no node {node}")

    def _admin_url(self) -> str:
        """The hub URL with the CLI's credentials (a local domain admits only its users)."""
        from cim_place.local.credentials import ADMIN

        return self.domain.credentials.url(ADMIN, self.domain.hub_urls)

    # -- the workload -----------------------------------------------------------------------------

    async def _workload(self, deadline: float) -> None:
        adds = 0
        nodes = self.domain.node_ids()
        while time.monotonic() < deadline and adds < self.max_adds:
            choice = self.rng.random()
            if choice < 0.6 or not self.acked:
                adds += 1
                await self._add(self.rng.choice(nodes), adds)
            elif choice < 0.95:
                await self._get(self.rng.choice(self.acked))
            else:
                await self._policy_change()

    async def _add(self, node: str, number: int) -> None:
        size = self.rng.choice((1024, 64 * 1024, 300_000, 2_500_000))
        data = self.rng.randbytes(size)
        path = self.work / f"add-{number}.bin"
        path.write_bytes(data)
        code, out, err = await _run_cli(
            "add",
            str(path),
            "--node",
            node,
            cwd=self.work,
            server=self._admin_url(),
            timeout=ADD_TIMEOUT,
        )
        path.unlink(missing_ok=True)
        if code is None:
            self.report.hangs.append(f"add #{number} on {node}")
        elif code == 0 and out.strip():
            digest = hashlib.sha256(data).hexdigest()
            self.acked.append(Acked(out.strip().splitlines()[-1], digest, size))
            self.report.adds_acknowledged += 1
        else:
            self.report.adds_failed += 1
            if self.report.adds_failed <= 3:
                self.report.notes.append(f"add #{number} on {node} failed: {err.strip()[:300]}")
            if "Traceback" in err:
                self.report.hangs.append(f"add #{number}: a traceback instead of an error")
                if sum("traceback of add" in n for n in self.report.notes) < 3:
                    # What broke, so that a failing run says it (the domain's logs go with it).
                    tail = " | ".join(err.strip().splitlines()[-3:])
                    self.report.notes.append(f"traceback of add #{number}: {tail[:600]}")

    async def _get(self, acked: Acked) -> bool:
        target = self.work / "get.out"
        code, _, _ = await _run_cli(
            "get",
            acked.cid,
            "-o",
            str(target),
            cwd=self.work,
            server=self._admin_url(),
            timeout=GET_TIMEOUT,
        )
        if code is None:
            self.report.hangs.append(f"get {acked.cid}")
            return False
        if code != 0:
            self.report.gets_failed += 1
            return False
        got = hashlib.sha256(target.read_bytes()).hexdigest()
        target.unlink(missing_ok=True)
        if got != acked.digest:
            self.report.wrong_reads += 1
            return False
        self.report.gets_ok += 1
        return True

    async def _policy_change(self) -> None:
        """Apply the default policy again, alone or with a two-copy policy for small objects."""
        policy = self.work / "policy.yaml"
        two = self.rng.random() < 0.5
        default = Path(__file__).resolve().parents[2] / "deploy" / "policies" / "default.yaml"
        files = [str(default)] if default.is_file() else []
        if two:
            policy.write_text(
                "name: small\nmatch: {size: {max: 2KiB}}\nreplicas: 2\nspread: zone\npriority: 10\n"
            )
            files.append(str(policy))
        if files:
            await _run_cli(
                "policy", "apply", *files, cwd=self.work, server=self._admin_url(), timeout=60
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
