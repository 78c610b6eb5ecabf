"""`cim-place status --state/--node/--policy/--name [--after CID] [--limit N] [--all]`: pages of
objects, ordered by CID.

The leading controller answers from its status index (request/reply on
``<prefix>.api.status``: cluster/controller/status_api.py), so a page costs milliseconds at a
million objects. When no controller answers (none runs, or none leads right now) the page is read
by a scan of the location shards instead, with the same filters and order, and a note on stderr
says so: slow at scale, but the operator still gets an answer.

With controller shards (``controller --shards N``) each process answers for the shards it leads
(its answer says which, and N): the first answer shows the listing is sharded, the request is
then sent again and answers are gathered until every shard is covered (or a short wait ends,
and a note names the shards missing), and the pages are merged in CID order.

The flags are checked with the controller's own request checks before connecting, so a bad value
is a usage error (exit 2) in the same words the controller would use. Heavy modules are imported
inside the functions: this is on an operator's hot path.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import typer

from cim_place.cli._output import EXIT_USAGE, fail, print_json
from cim_place.cluster.controller.status_rows import (
    STATUS_API,
    BadStatusQuery,
    Query,
    parse_request,
    row_of,
)
from cim_place.errors import CimPlaceError

if TYPE_CHECKING:
    from nats.js import JetStreamContext

TIMEOUT = 5.0
"""Seconds to wait for the controller before reading the locations instead."""
GATHER = 2.0
"""Seconds to wait for the other shards' answers once one sharded answer came."""


def make_query(
    state: str | None,
    node: str | None,
    policy: str | None,
    name: str | None,
    after: str | None,
    limit: int,
) -> Query:
    """The page the flags ask for; a usage error naming the flag when one is bad."""
    fields = {"state": state, "node": node, "policy": policy, "name": name, "after": after}
    request: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    request["limit"] = limit
    try:
        query = parse_request(json.dumps(request).encode())
    except BadStatusQuery as exc:
        raise fail(f"--{exc.field}: {exc}" if exc.field else str(exc), EXIT_USAGE) from None
    assert isinstance(query, Query)
    return query


def _request(query: Query) -> bytes:
    fields = {
        "state": query.state,
        "node": query.node,
        "policy": query.policy,
        "name": query.name,
        "after": query.after,
    }
    request: dict[str, Any] = {key: value for key, value in fields.items() if value is not None}
    request["limit"] = query.limit
    return json.dumps(request).encode()


async def _ask(js: JetStreamContext, query: Query, timeout: float) -> dict[str, Any] | None:
    """The controller's page, or None when no controller answered."""
    import nats.errors

    from cim_place.cluster.nats.subjects import Subjects

    nc = js._nc  # the connection run_in_domain opened: a request needs core NATS, not JetStream
    try:
        reply = await nc.request(Subjects().api(STATUS_API), _request(query), timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
        return None
    doc = _parse(reply.data)
    if isinstance(doc.get("of"), int) and set(doc.get("shards", [])) != set(range(doc["of"])):
        doc = await _gather(js, query, doc)
    doc.pop("shards", None)
    doc.pop("of", None)
    doc["source"] = "index"
    return doc


def _parse(data: bytes) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(data)
    except ValueError:
        raise CimPlaceError(
            "the controller's answer is not JSON; is it a cim-place controller?"
        ) from None
    if "error" in doc:
        if doc.get("code") == "bad_request":
            raise fail(str(doc["error"]), EXIT_USAGE)
        raise CimPlaceError(str(doc["error"]))
    return doc


async def _gather(js: JetStreamContext, query: Query, first: dict[str, Any]) -> dict[str, Any]:
    """Ask every shard's leader (module docstring) and merge their pages."""
    import asyncio

    from nats.aio.msg import Msg

    from cim_place.cluster.nats.subjects import Subjects

    nc = js._nc
    shards = int(first["of"])
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_answer(msg: Msg) -> None:
        answers.put_nowait(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_answer)
    docs: list[dict[str, Any]] = []
    covered: set[int] = set()
    try:
        await nc.publish(Subjects().api(STATUS_API), _request(query), reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GATHER
        while covered != set(range(shards)) and loop.time() < deadline:
            try:
                async with asyncio.timeout(deadline - loop.time()):
                    doc = _parse(await answers.get())
            except TimeoutError:
                break
            if doc.get("of") == shards and not set(doc.get("shards", [])) <= covered:
                docs.append(doc)
                covered |= set(doc.get("shards", []))
    finally:
        await sub.unsubscribe()
    if not docs:
        docs = [first]
        covered = set(first.get("shards", []))
    merged = merge_pages(docs, query.limit)
    missing = sorted(set(range(shards)) - covered)
    if missing:
        merged["note"] = (
            f"controller shard(s) {', '.join(map(str, missing))} of {shards} did not answer: "
            "their objects are not listed"
        )
    return merged


def merge_pages(docs: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """One page from the pages of several shards' leaders, each the first ``limit`` rows of its
    shards after the same cursor: the ``limit`` lowest CIDs of all, and a cursor if more."""
    if any("object" in doc for doc in docs):
        found = next((doc["object"] for doc in docs if doc.get("object")), None)
        merged: dict[str, Any] = {"object": found}
    else:
        rows = sorted(
            {row["cid"]: row for doc in docs for row in doc.get("objects", [])}.values(),
            key=lambda row: str(row["cid"]),
        )
        shown = rows[:limit]
        more = len(rows) > limit or any(doc.get("next") for doc in docs)
        merged = {"objects": shown, "next": shown[-1]["cid"] if more and shown else None}
    merged["indexed"] = sum(int(doc.get("indexed") or 0) for doc in docs)
    merged["tracked"] = max(int(doc.get("tracked") or 0) for doc in docs)
    return merged


async def _scan(js: JetStreamContext, query: Query) -> dict[str, Any]:
    """The same page from a scan of the location shards (no controller answered)."""
    from cim_place.cluster.state.overview import listing

    rows = sorted(
        (row for row in map(row_of, await listing(js, query.state)) if query.matches(row)),
        key=lambda row: row.cid,
    )
    shown = rows[: query.limit]
    return {
        "objects": [row.to_dict() for row in shown],
        "next": shown[-1].cid if len(rows) > query.limit else None,
        "indexed": None,
        "tracked": None,
        "source": "scan",
    }


async def fetch(
    js: JetStreamContext, query: Query, *, every: bool = False, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """One page (every page, joined, with ``every``): from the controller, else a scan."""
    doc = await _ask(js, query, timeout)
    if doc is None:
        return await _scan(js, query if not every else _unlimited(query))
    while every and doc["next"] is not None:
        following = Query(
            query.state, query.node, query.policy, query.name, doc["next"], query.limit
        )
        more = await _ask(js, following, timeout)
        if more is None:
            raise CimPlaceError("the controller stopped answering while listing; retry")
        doc["objects"].extend(more["objects"])
        doc["next"] = more["next"]
    return doc


def _unlimited(query: Query) -> Query:
    return Query(query.state, query.node, query.policy, query.name, query.after, sys.maxsize)


def show_page(doc: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    """Print a page: JSON (docs/STATUS.md), the CIDs alone (``quiet``), or a table."""
    if doc["source"] == "scan":
        typer.echo(
            "note: no controller answered; listed by a scan of the locations (slow at scale)",
            err=True,
        )
    if as_json:
        print_json(doc)
        return
    rows = doc["objects"]
    if quiet:
        for row in rows:
            typer.echo(row["cid"])
        return
    from rich.table import Table

    from cim_place.cli._views import make_console, size_text

    table = Table()
    for column in ("cid", "name", "state", "copies", "policy", "size", "nodes"):
        table.add_column(column)
    for row in rows:
        copies = f"{row['pinned']}/{row['desired']}"
        if row["damaged"]:
            copies += f" ({row['damaged']} damaged)"
        table.add_row(
            row["cid"],
            row["name"] or "",
            row["state"],
            copies,
            row["policy"],
            size_text(row["size"]),
            ", ".join(row["nodes"]),
        )
    console = make_console()
    console.print(table)
    console.print(f"{len(rows)} object(s)", markup=False)
    if doc["next"] is not None:
        console.print(f"more: add --after {doc['next']} (or --all)", markup=False)
    if doc.get("note"):
        console.print(f"note: {doc['note']}", markup=False, style="yellow")
    indexed, tracked = doc.get("indexed"), doc.get("tracked")
    if indexed is not None and tracked is not None and indexed < tracked:
        console.print(
            f"note: the controller has indexed {indexed} of {tracked} objects so far (it looks "
            "at each once after taking the lead)",
            markup=False,
            style="yellow",
        )
