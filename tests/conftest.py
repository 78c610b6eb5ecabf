"""Shared pytest configuration: real nats-server fixtures come from cim_place.testing; the
block-exchange fixtures (a pair of leaves, a client on each, B's volume) from tests/exchange.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from exchange import Pair

from cim_place.cluster.connection import connected
from cim_place.objectstore.blockstore import FsBlockStore

if TYPE_CHECKING:  # imported by pytest_plugins below, after assertion rewriting is set up
    from cim_place.testing import LeafFactory

pytest_plugins = ["cim_place.testing"]


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
