"""Read counts travel from an agent's reporter to the controller's window over a real
nats-server: one report per interval, never per read; reports are validated before use."""

from __future__ import annotations

from cim_place.cluster.agent.demand import DemandReporter
from cim_place.cluster.controller.demand import DemandIntake
from cim_place.cluster.nats.connection import flushed
from cim_place.cluster.nats.envelope import Content, Envelope
from cim_place.cluster.nats.subjects import Subjects
from cim_place.local.servers import NatsServer
from cim_place.placement.demand_window import DemandReport, DemandWindow, ReadCount
from cim_place.testing import ClientFactory, until

CID = b"\x01\x55\x12\x20" + bytes(32)


class Clock:
    """A clock the test moves, so no assertion depends on wall time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_reads_become_one_report_in_the_controller_window(
    nats_server: NatsServer, nats_client: ClientFactory
) -> None:
    subjects = Subjects()
    window = DemandWindow(horizon=600, slot=60)
    clock = Clock()
    async with nats_client(nats_server.url) as agent_nc, nats_client(nats_server.url) as ctl_nc:
        intake = DemandIntake(ctl_nc, subjects, window)
        await intake.start()
        await flushed(ctl_nc)
        reporter = DemandReporter(agent_nc, subjects, "leaf-5", interval=5.0, clock=clock)
        for _ in range(7):
            reporter.record_read(CID, "leaf-5", "shop", size=100)
            clock.now += 0.1
        assert await reporter.flush() == 0  # not due: reads are never sent one by one
        clock.now += 5.0
        assert await reporter.flush() == 1
        await until(lambda: intake.received == 1, "the report")
        assert (reporter.reads_recorded, reporter.reports_sent, reporter.reads_dropped) == (7, 1, 0)
        reads = window.by_node(CID, clock.now, 600)
        assert reads["leaf-5"].count == 7 and reads["leaf-5"].bytes == 700
        assert window.by_object_service(CID, clock.now, 600)["shop"].count == 7

        # A node may only report for itself, and only DemandReported events count.
        forged = DemandReport("leaf-1", 0.0, 1.0, (ReadCount(CID, "leaf-1", "", 50, 0, 0.5),))
        bad = [
            Envelope.new(Content("event", "DemandReported", forged.to_dict()), owner="x"),
            Envelope.new(Content("event", "ObjectStored", {}), owner="x"),
        ]
        for envelope in bad:
            await agent_nc.publish(subjects.demand("leaf-5"), envelope.encode())
        await agent_nc.publish(subjects.demand("leaf-5"), b"garbage")
        await until(lambda: intake.refused == 3, "the refusals")
        assert intake.received == 1 and "leaf-1" not in window.by_node(CID, clock.now, 600)
        await intake.stop()
