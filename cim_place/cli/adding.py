"""`cim-place add` into a domain: which node stores the first copy, the upload, the domain name.

Inside a domain directory (a ``.cim-place/context.json`` above the working directory, or
``--server``/``--node``), ``add`` stores the file in the domain, not in a local store. The node
that takes the upload is, in order: ``--node``; the node the policy would place the object's
first copy on (the planner, from the file's CID computed locally first, so the controller does
not move it afterwards); the up node with the most free bytes (standard input, whose CID is not
known before the upload). The choice is said on stderr. ``--name`` is also set as a domain name
(KV ``cim-place-names``), so ``status``, ``get`` and ``rm`` take it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import BinaryIO

from nats.aio.client import Client
from nats.js import JetStreamContext

from cim_place.cli._domain import actor, check_known_node, choose_domain
from cim_place.cli._files import compute_cid
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import check_node_id
from cim_place.errors import CimPlaceError


@dataclass(frozen=True, slots=True)
class DomainAdd:
    cid: str
    size: int
    blocks: int
    node: str
    why: str
    name_revision: int | None


async def _by_policy(
    js: JetStreamContext,
    file: str,
    profile: str,
    name: str | None,
    owner: str,
    meta: dict[str, str],
) -> tuple[str, str] | None:
    """The node of the first volume the planner picks for the file, with its policy's name."""
    from cim_place.cli.placing import place_in_domain
    from cim_place.cluster.state.policies import load_policies
    from cim_place.policies.selectors import ObjectFacts

    if file == "-":
        return None
    cid = compute_cid(file, profile)
    with contextlib.suppress(CimPlaceError):
        policy_set = (await load_policies(js)).policy_set
        facts = ObjectFacts(cid=cid, name=name, owner=owner, metadata=meta)
        found = await place_in_domain(js, cid, facts, policy_set)
        if found.placing is not None and found.placing.desired:
            return found.placing.desired[0].split("/", 1)[0], found.placing.policy
    return None


async def _most_free(js: JetStreamContext) -> str:
    from cim_place.cluster.state.nodes import list_nodes

    records = await list_nodes(js)
    if not records:
        raise CimPlaceError(
            "no node of the domain heartbeats: start the agents (`cim-place up`), or pass --store "
            "DIR to add to a local store"
        )
    best = max(records, key=lambda r: (sum(v.free for v in r.volumes), r.node))
    return best.node


async def _choose(
    nc: Client,
    js: JetStreamContext,
    node: str | None,
    file: str,
    profile: str,
    name: str | None,
    owner: str,
    meta: dict[str, str],
) -> tuple[str, str]:
    if node is not None:
        check_node_id(node)
        return await check_known_node(js, node), "--node"
    own = (nc._server_info or {}).get("domain")
    if own and own != await choose_domain(nc, None):
        return str(own), "the leaf connected to"
    placed = await _by_policy(js, file, profile, name, owner, meta)
    if placed is not None:
        target, policy = placed
        return await check_known_node(js, target), f"first copy by policy {policy!r}"
    return await _most_free(js), "most free space"


async def add_to_domain(
    server: str | None,
    creds: str | None,
    node: str | None,
    file: str,
    stream: BinaryIO,
    size: int | None,
    *,
    name: str | None,
    profile: str,
    owner: str,
    metadata: dict[str, str],
) -> DomainAdd:
    """Upload ``stream`` (read from ``file``) to a node of the domain, and name it there."""
    from cim_place.cluster.exchange.upload_client import upload
    from cim_place.cluster.state.name_record import check_name
    from cim_place.cluster.state.names import NameRegistry

    if name is not None:
        check_name(name)  # before any byte moves: nothing applied partially
    async with connected(server, creds=creds) as nc:
        js = jetstream(nc, await choose_domain(nc, None))
        target, why = await _choose(nc, js, node, file, profile, name, owner, metadata)
        result = await upload(
            nc,
            target,
            stream,
            name=name,
            owner=owner,
            metadata=metadata,
            profile=profile,
            size=size,
        )
        revision = None
        if name is not None:
            revision = await NameRegistry(js).set(name, result.cid, by=actor())
    return DomainAdd(result.cid_text, result.size, result.blocks, target, why, revision)
