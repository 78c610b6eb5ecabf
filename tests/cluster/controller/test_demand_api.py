"""The controller's demand answers (``api.demand``) over a real nats-server: a malformed
request gets an error answer naming the problem, never a crash or silence."""

from __future__ import annotations

import json

import pytest

from cim_place.cluster.controller.cached import CachedCopies
from cim_place.cluster.controller.demand_api import DEMAND_API, DemandQueries
from cim_place.cluster.controller.metrics import ControllerMetrics
from cim_place.cluster.controller.projection import Projection
from cim_place.cluster.nats.subjects import Subjects
from cim_place.local.servers import NatsServer
from cim_place.testing import ClientFactory

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("request_bytes", "problem"),
    [
        (b"not json", "Expecting value"),
        (b"\xff\xfe", "Expecting value"),
        (b"[]", "string `cid`"),
        (b'{"cid": 7}', "string `cid`"),
        (b'{"cid": "f"}', "CID"),
        (DEEP, "recursion"),
    ],
)
async def test_a_malformed_demand_request_is_answered_with_an_error(
    nats_server: NatsServer, nats_client: ClientFactory, request_bytes: bytes, problem: str
) -> None:
    async with nats_client(nats_server.url) as nc:
        projection = Projection()
        cached = CachedCopies(projection, ControllerMetrics(), lambda cids: None)
        queries = DemandQueries(
            nc, Subjects(), cached, is_leader=lambda: True, policy_of=lambda cid: None
        )
        await queries.start()
        await nc.flush()
        reply = await nc.request(Subjects().api(DEMAND_API), request_bytes, timeout=10)
        answer = json.loads(reply.data)
        assert problem.lower() in answer["error"].lower(), answer
