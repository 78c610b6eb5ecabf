"""AddDocument: a command carrying a large PDF, and a listener that reads the document back by CID.

Three parties, each with its own connection:

1. a **client** on node-a sends ``AddDocument`` with the PDF in its body. The PDF is above the
   offload threshold, so comms stores it through node-a's agent and the command travels with a
   CID link in its place;
2. a **document service** on node-b handles ``AddDocument``: it records the title and answers
   with a ``DocumentAdded`` event that passes the same link on (the PDF is not copied again).
   The event is persisted in the domain's event store;
3. a **listener** on node-b receives ``DocumentAdded``, reads the PDF by its CID (fetched from
   node-a's agent and verified block by block) and checks it byte for byte.

Run it on a throwaway domain it starts itself (a hub, two leaves, an agent on each)::

    .venv/bin/python examples/add_document.py [--pdf FILE]

or against a running domain, both parties on one leaf whose agent is NODE::

    .venv/bin/python examples/add_document.py --server nats://HOST:PORT --node NODE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from cim_place.cluster.agent.config import AgentConfig, VolumeConfig
from cim_place.cluster.agent.service import Agent
from cim_place.cluster.events.store import ensure_event_store
from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.envelope import Content
from cim_place.cluster.tasks.queue import ensure_task_stream
from cim_place.comms import Attachment, Comms, Message, command, event
from cim_place.local.topologies import add_leaf, start_hub
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.testdata import chacha_stream

SAMPLE_BYTES = 12 * 1024 * 1024 + 321  # about a 100-page scanned PDF


@contextlib.asynccontextmanager
async def throwaway_domain(work: Path) -> AsyncIterator[dict[str, str]]:
    """A hub and two leaves (node-a, node-b) with an agent each; yields node -> leaf URL."""
    hub = start_hub(work / "hub", size=1)
    leaves = {}
    agents: list[Agent] = []
    try:
        for node in ("node-a", "node-b"):
            leaves[node] = add_leaf(hub, work / node, node)
        async with connected(hub.url) as nc:
            await ensure_event_store(jetstream(nc, "hub"), replicas=1)
            await ensure_task_stream(jetstream(nc, "hub"), 1)
        for node, leaf in leaves.items():
            config = AgentConfig(
                node=node,
                volumes=(VolumeConfig("v0", work / node / "v0"),),
                servers=(leaf.url,),
                labels={"zone": node},
            )
            agent = Agent(config, fsync="none")
            await agent.start()
            agents.append(agent)
        async with connected(leaves["node-b"].url) as nc:
            await wait_for_holder(nc, "node-a", timeout=10)
        yield {node: leaf.url for node, leaf in leaves.items()}
    finally:
        for agent in agents:
            await agent.stop(grace=1)
        for leaf in leaves.values():
            leaf.stop()
        hub.stop()


async def run(
    sender_url: str, sender_node: str, service_url: str, service_node: str, pdf: Path
) -> None:
    expected = hashlib.sha256(pdf.read_bytes()).hexdigest()
    client = await Comms.connect(sender_url, sender_node, owner="alice")
    service = await Comms.connect(service_url, service_node, owner="documents")
    listener = await Comms.connect(service_url, service_node, owner="reader")
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def add_document(message: Message) -> Content:
        ref = message.ref("pdf")
        print(f"service:  {message.type} {message.body['title']!r}, pdf -> {ref}")
        return event("DocumentAdded", {"title": message.body["title"], "pdf": ref})

    async def document_added(message: Message) -> None:
        ref = message.ref("pdf")
        started = time.perf_counter()
        data = await message.read("pdf")
        seconds = time.perf_counter() - started
        assert isinstance(data, bytes)
        digest = hashlib.sha256(data).hexdigest()
        print(
            f"listener: {message.type} (caused by {message.envelope.causation_id}): "
            f"read {len(data)} bytes of {to_str(ref.cid)} in {seconds:.2f} s"
        )
        if not done.done():
            done.set_result(digest)

    try:
        await service.subscribe("AddDocument", add_document, kinds=("command",))
        await listener.subscribe("DocumentAdded", document_added, kinds=("event",))
        await asyncio.sleep(0.5)  # let the subscriptions reach the client's leaf
        started = time.perf_counter()
        sent = await client.send(
            command(
                "AddDocument",
                {"title": "Annual report", "pdf": Attachment(pdf, "application/pdf")},
            )
        )
        print(
            f"client:   sent AddDocument {sent.id} in {time.perf_counter() - started:.2f} s; "
            f"the message is {len(sent.encode())} bytes, the PDF {pdf.stat().st_size}"
        )
        digest = await asyncio.wait_for(done, 60)
        print("identical bytes:", digest == expected)
        if digest != expected:
            raise SystemExit("the document read back differs from the one sent")
    finally:
        for comms in (listener, service, client):
            await comms.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="a leaf of a running domain (default: start one)")
    parser.add_argument("--node", help="the node id of that leaf's agent")
    parser.add_argument("--pdf", type=Path, help="the document to send (default: generated)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cim-place-add-document-") as tmp:
        work = Path(tmp)
        pdf = args.pdf
        if pdf is None:
            pdf = work / "report.pdf"
            pdf.write_bytes(chacha_stream("annual-report", SAMPLE_BYTES).read())
        if args.server:
            if not args.node:
                parser.error("--server needs --node (the node id of its agent)")
            await run(args.server, args.node, args.server, args.node, pdf)
            return
        async with throwaway_domain(work) as urls:
            await run(urls["node-a"], "node-a", urls["node-b"], "node-b", pdf)


if __name__ == "__main__":
    asyncio.run(main())
