"""Malformed gateway requests, generated: every answer is a 4xx (or a valid 2xx/3xx for input
that happens to be valid), never a 5xx, and the gateway keeps serving afterwards."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from cim_place.http.gateway import Gateway
from cim_place.http.gateway_request import BadRequest, parse_content_path, parse_range, wanted
from cim_place.http.server import HttpServers, Listener
from cim_place.http.sources import LocalContent
from cim_place.objectstore.cid import to_str
from cim_place.objectstore.store import ObjectStore

FUZZED = 10_000


@given(st.text(max_size=80), st.text(max_size=80))
def test_path_parser_refuses_cleanly(cid: str, rest: str) -> None:
    try:
        parse_content_path(cid, rest)
    except BadRequest as exc:
        assert exc.status == 400 and "\n" not in exc.reason


@given(st.text(max_size=60), st.integers(min_value=0, max_value=1 << 40))
def test_range_parser_refuses_cleanly(header: str, size: int) -> None:
    try:
        found = parse_range(header, size)
    except BadRequest as exc:
        assert exc.status in (400, 416)
        return
    if found is not None:
        first, last = found
        assert 0 <= first <= last < size


@given(st.dictionaries(st.sampled_from(["format", "dag-scope", "entity-bytes"]), st.text()))
def test_format_parser_refuses_cleanly(query: dict[str, str]) -> None:
    try:
        wanted(query, "")
    except BadRequest as exc:
        assert exc.status == 400


def _fuzzed_requests(cid: str, rng: random.Random) -> list[tuple[str, dict[str, str]]]:
    junk = ["", "%", "%zz", "%ff", "..", ".", "//", "\u00e9", "a" * 300, "?", "#", "%00", "~"]
    cids = [cid, cid[:-1], cid.upper(), "Qm" + cid[2:], "z" + cid[1:], "f01", "bafy", "k51"]
    queries = [
        "",
        "?format=raw",
        "?format=car",
        "?format=",
        "?format=car&dag-scope=",
        "?format=car&dag-scope=entity&entity-bytes=-1:-5",
        "?format=car&dag-scope=entity&entity-bytes=99999999999999999999:1",
        "?format=car&car-version=2",
        "?filename=%ff",
    ]
    headers = [
        {},
        {
            "Range": "bytes="
            + rng.choice(["-", "1-0", "x-y", "-0", "0-", "99999999999-", "1-2,3-4"])
        },
        {"Range": "items=0-1"},
        {"If-None-Match": rng.choice(["", "*", '"x"', "W/", ","])},
        {"Accept": rng.choice(["application/vnd.ipld.car; version=9", ";;;", "*/*", ","])},
        {"Authorization": rng.choice(["Bearer", "Basic x", "bearer  ", "x"])},
    ]
    out = []
    for _ in range(FUZZED):
        path = "/ipfs/" + rng.choice(cids)
        for _ in range(rng.randrange(3)):
            path += "/" + rng.choice(junk)
        out.append((path + rng.choice(queries), rng.choice(headers)))
    return out


async def test_fuzzed_requests_get_4xx_and_no_crash(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "v0", fsync="none")
    root = store.add(io.BytesIO(b"fuzz target " * 1000)).root
    servers = HttpServers(
        [Listener("gateway", Gateway(LocalContent(store.blocks)).app(), "127.0.0.1:0")]
    )
    await servers.start()
    rng = random.Random(17)
    statuses: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession(base_url=servers.urls["gateway"]) as session:
            for path, headers in _fuzzed_requests(to_str(root), rng):
                async with session.get(path, headers=headers, allow_redirects=False) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    assert resp.status < 500, (path, headers, resp.status)
            async with session.get(f"/ipfs/{to_str(root)}") as resp:
                assert resp.status == 200 and await resp.read() == b"fuzz target " * 1000
    finally:
        await servers.stop()
        store.close()
    assert sum(n for status, n in statuses.items() if 400 <= status < 500) > FUZZED // 2


@settings(deadline=None, max_examples=50)
@given(st.binary(min_size=0, max_size=64))
def test_raw_path_bytes(data: bytes) -> None:
    text = data.decode("latin-1")
    with contextlib.suppress(BadRequest):
        parse_content_path(text, text)
