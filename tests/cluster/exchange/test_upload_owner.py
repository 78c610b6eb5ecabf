"""Who owns an upload in a domain that authenticates its users: the requester NATS vouches for.

One server runs the accounts ``cim-place security gen`` produces; an agent's upload service takes
uploads on it as the agent's own user.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.exchange.upload_server import UploadService
from cim_place.cluster.nats.connection import connect
from cim_place.cluster.nats.security import AccessDeniedError
from cim_place.cluster.nats.users import plan_domain
from cim_place.objectstore.store import ObjectStore
from cim_place.testing import SecuredServer, secured_server

pytestmark = pytest.mark.nats

NODE = "a"


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredServer]:
    plan = plan_domain([NODE], readers={"alice": None, "bob": None})
    directory = tmp_path_factory.mktemp("owners")
    domain = secured_server(directory, [*plan.hub, *plan.leaves[NODE]], "owners")
    try:
        yield domain
    finally:
        domain.stop()


@pytest_asyncio.fixture
async def store(domain: SecuredServer, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    store = ObjectStore(tmp_path / "volume")
    agent = await connect(domain.url(f"agent-{NODE}"), for_service=True)
    service = UploadService(agent, NODE, store, authenticated=True)
    await service.start()
    try:
        yield store
    finally:
        await service.stop()
        await agent.close()
        store.close()


async def _upload(domain: SecuredServer, store: ObjectStore, user: str, owner: str) -> str:
    """Upload as ``user`` claiming ``owner``; the owner the agent recorded on the pin."""
    nc = await connect(domain.url(user))
    try:
        result = await upload(nc, NODE, io.BytesIO(b"x" * 5000 + user.encode()), owner=owner)
    finally:
        await nc.close()
    pin = store.pins.get(result.cid)
    assert pin is not None
    return pin.owner


async def test_the_owner_is_the_authenticated_requester(
    domain: SecuredServer, store: ObjectStore
) -> None:
    assert await _upload(domain, store, "alice", "") == "alice"
    assert await _upload(domain, store, "alice", "alice") == "alice"


async def test_claiming_another_owner_is_refused_and_pins_nothing(
    domain: SecuredServer, store: ObjectStore
) -> None:
    with pytest.raises(AccessDeniedError, match="alice may not upload as owner 'bob'"):
        await _upload(domain, store, "alice", "bob")
    assert store.pins.list() == []
