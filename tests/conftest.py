"""Shared pytest configuration: real nats-server fixtures come from cim_place.testing; the
block-exchange fixtures (a pair of leaves, a client on each, B's volume) from tests/exchange.py."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from exchange import Pair
from hypothesis import HealthCheck, settings

from cim_place.cluster.nats.connection import connected
from cim_place.objectstore.blockstore import FsBlockStore

if TYPE_CHECKING:  # imported by pytest_plugins below, after assertion rewriting is set up
    from cim_place.testing import LeafFactory

pytest_plugins = ["cim_place.testing"]

# Property tests judge correctness, never speed: on a loaded 2-core machine data generation can
# be slow, which must not fail a run (tests that set their own settings keep them).
settings.register_profile("cim-place", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cim-place")

# Fixtures that start nats-server: a test using any of them is marked `nats` automatically; a
# module that starts servers some other way says `pytestmark = pytest.mark.nats` itself.
NATS_FIXTURES = frozenset(
    {"nats_server", "hub1", "hub", "hub_cluster", "leaf_factory", "nats_client", "pair", "clients"}
)


def pytest_configure(config: pytest.Config) -> None:
    if "not nats" in (config.option.markexpr or ""):
        # A test that starts nats-server without the marker fails loudly instead of slowing the
        # pure half (cim_place.local.server_spec.find_nats_server checks this).
        os.environ["CIM_PLACE_TEST_NO_NATS"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NATS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.nats)


@pytest.fixture
def pair(leaf_factory: LeafFactory) -> Pair:
    """Two leaves of the shared hub: A holds, B fetches."""
    return Pair(leaf_factory("leaf-a"), leaf_factory("leaf-b"))


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[FsBlockStore]:
    """B's volume."""
    with FsBlockStore(tmp_path / "volume-b", fsync="none") as store:
        yield store


@pytest.fixture
async def clients(pair: Pair) -> AsyncIterator[tuple[Any, Any]]:
    """A client on each leaf: (A's, B's)."""
    async with connected(pair.a.url) as nc_a, connected(pair.b.url) as nc_b:
        yield nc_a, nc_b
