"""`cim-place scrub`: ask agents to re-verify every pinned block now, wait, print what was found.

Each agent answers a request on ``<prefix>.agent.<node>.scrub`` with its pass's report
(:mod:`cim_place.cluster.agent.scrubbing`). Without ``--node``, every node with a live heartbeat
is asked, all at once. Exit 0 when every asked node ran its pass, whatever it found (damage is
also announced as ``ReplicaDamaged`` and repaired by the controller); 1 when a node could not.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from cim_place.cli._domain import CredsOption, DomainOption, ServerOption, choose_domain
from cim_place.cli._output import JsonOption, errors_as_exit, fail, print_json
from cim_place.errors import TransportError

NodeOption = Annotated[
    str | None,
    typer.Option(
        "--node", "-n", help="Scrub this node only (default: every live node).", show_default=False
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", help="Seconds to wait for each node's pass.", min=1.0),
]


async def _ask(nc: Any, node: str, timeout: float) -> dict[str, Any]:
    import nats.errors

    from cim_place.cluster.nats.subjects import Subjects

    try:
        reply = await nc.request(Subjects().agent_scrub(node), b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        return {"error": f"no agent of node {node} answers (is it running?)"}
    except nats.errors.TimeoutError:
        return {"error": f"node {node} did not finish its pass within {timeout:g} s (--timeout)"}
    try:
        answer = json.loads(reply.data)
    except ValueError:
        return {"error": f"node {node} answered something that is not a scrub report"}
    return answer if isinstance(answer, dict) else {"error": f"node {node}: bad answer"}


async def scrub_nodes(
    server: str | None, creds: str | None, domain: str | None, node: str | None, timeout: float
) -> dict[str, dict[str, Any]]:
    """Each asked node's report (or ``{"error": ...}``)."""
    from cim_place.cluster.nats.connection import connected, jetstream
    from cim_place.cluster.state.nodes import list_nodes

    async with connected(server, creds=creds) as nc:
        if node is not None:
            nodes = [node]
        else:
            js = jetstream(nc, await choose_domain(nc, domain))
            nodes = sorted({record.node for record in await list_nodes(js)})
            if not nodes:
                raise TransportError("no node has a live heartbeat: nothing to scrub")
        answers = await asyncio.gather(*(_ask(nc, n, timeout) for n in nodes))
    return dict(zip(nodes, answers, strict=True))


def scrub_command(
    node: NodeOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 3600.0,
    server: ServerOption = None,
    creds: CredsOption = None,
    domain: DomainOption = None,
) -> None:
    """Re-verify every block of every pinned object on a node (or all), now; print the damage."""
    with errors_as_exit():
        answers = asyncio.run(scrub_nodes(server, creds, domain, node, timeout))
    reports = {n: a for n, a in answers.items() if "error" not in a}
    failed = {n: str(a["error"]) for n, a in answers.items() if "error" in a}
    if as_json:
        document: dict[str, Any] = {
            "nodes": {
                n: {
                    "blocks_checked": int(r.get("blocks_checked", 0)),
                    "bytes_checked": int(r.get("bytes_checked", 0)),
                    "damaged": list(r.get("damaged", [])),
                }
                for n, r in reports.items()
            }
        }
        if failed:
            document["errors"] = failed
        print_json(document)
    else:
        for n, r in reports.items():
            damaged = r.get("damaged", [])
            typer.echo(
                f"{n}: {r.get('blocks_checked', 0)} blocks, {r.get('bytes_checked', 0)} bytes "
                f"checked, {len(damaged)} damaged"
            )
            for item in damaged:
                typer.echo(f"  {item['problem']:<8} block {item['block']} of {item['root']}")
    if failed:
        raise fail("; ".join(f"{n}: {m}" for n, m in failed.items()))


def register(app: typer.Typer) -> None:
    app.command("scrub")(scrub_command)
