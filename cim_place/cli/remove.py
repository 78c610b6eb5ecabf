"""`cim-place rm CID|NAME`: remove an object from the whole domain.

The operator's NATS user may not publish events, so the command asks the leading controller on
``<prefix>.api.rm`` (cluster/controller/removal.py says why and what it does): the controller
refuses a protected object, publishes the tombstone, removes the names that point at the object
and answers; every copy is then dropped by tasks and the agents free the blocks no other pin uses.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from cim_place.cli._domain import CredsOption, ServerOption, actor
from cim_place.cli._output import JsonOption, handles_errors, print_json
from cim_place.errors import CimPlaceError, TransportError

_TIMEOUT = 15.0


async def request_removal(
    server: str | None, creds: str | None, ref: str, reason: str, timeout: float
) -> dict[str, Any]:
    """Ask the leading controller to remove ``ref``; its answer, or an error naming the cause."""
    import nats.errors

    from cim_place.cluster.controller.removal import RM_API
    from cim_place.cluster.nats.connection import connected
    from cim_place.cluster.nats.subjects import Subjects

    request = json.dumps({"ref": ref, "by": actor(), "reason": reason}).encode()
    async with connected(server, creds=creds) as nc:
        try:
            reply = await nc.request(Subjects().api(RM_API), request, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise TransportError(
                "no controller listens on the domain's API: start one (`cim-place up` runs one, "
                "or `cim-place controller`), then retry"
            ) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise TransportError(
                f"no controller answered within {timeout:g} s: none leads the domain right now "
                "(a new leader takes over within seconds of losing one); retry"
            ) from None
    try:
        answer: dict[str, Any] = json.loads(reply.data)
    except ValueError:
        raise TransportError(
            "the controller's answer is not JSON; is it a cim-place controller?"
        ) from None
    if "error" in answer:
        raise CimPlaceError(str(answer["error"]))
    return answer


@handles_errors
def rm_command(
    ref: Annotated[str, typer.Argument(help="A CID or a domain-wide name.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why, recorded in the tombstone event.")
    ] = "",
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the controller.")
    ] = _TIMEOUT,
    json_out: JsonOption = False,
    server: ServerOption = None,
    creds: CredsOption = None,
) -> None:
    """Remove an object from the domain: every copy is dropped, names pointing at it removed.

    Refused while a policy marks the object `protected`. `status CID` then says `removed`.
    """
    answer = asyncio.run(request_removal(server, creds, ref, reason, timeout))
    if json_out:
        print_json(answer)
        return
    cid = answer.get("cid", ref)
    names = answer.get("names") or []
    if answer.get("already"):
        typer.echo(f"{cid} was already removed from the domain")
        return
    copies = int(answer.get("copies", 0))
    typer.echo(
        f"removed {cid} (policy {answer.get('policy', '-')}): dropping {copies} "
        f"cop{'y' if copies == 1 else 'ies'}; their blocks are freed on each node"
    )
    typer.echo(f"names removed: {', '.join(names) if names else 'none'}")


def register(app: typer.Typer) -> None:
    app.command("rm")(rm_command)
