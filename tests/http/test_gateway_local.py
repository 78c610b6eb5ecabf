"""The trustless gateway over one node's volume (no NATS): formats, ranges, caching headers,
directories, CAR scopes, errors and corrupt blocks, through a real loopback listener."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from cim_place.http.gateway import Gateway
from cim_place.http.server import HttpServers, Listener
from cim_place.http.sources import Identify, LocalContent, token_digest
from cim_place.objectstore import car, dagpb
from cim_place.objectstore.cid import DAG_PB, Cid, make_cid, to_str
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream

MiB = 1 << 20
BIG = 3 * MiB + 5


@dataclass
class Site:
    url: str
    store: ObjectStore
    big: Cid
    data: bytes
    small: Cid
    folder: Cid
    session: aiohttp.ClientSession

    async def get(self, path: str, **kwargs: object) -> tuple[int, Mapping[str, str], bytes]:
        async with self.session.get(self.url + path, allow_redirects=False, **kwargs) as resp:  # type: ignore[arg-type]
            return resp.status, CIMultiDict(resp.headers), await resp.read()


def directory(store: ObjectStore, entries: dict[str, Cid]) -> Cid:
    links = tuple(
        dagpb.PBLink(cid, name, store.blocks.block_size(cid))
        for name, cid in sorted(entries.items())
    )
    block = dagpb.encode_node(
        dagpb.PBNode(links, dagpb.encode_unixfs(dagpb.UnixFSData(dagpb.UNIXFS_DIRECTORY)))
    )
    cid = make_cid(DAG_PB, block)
    store.blocks.put(cid, block)
    return cid


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    store = ObjectStore(tmp_path / "v0", fsync="none")
    data = chacha_stream("gateway", BIG).read()
    big = store.add(io.BytesIO(data)).root
    small = store.add(io.BytesIO(b"hello gateway\n")).root
    png = store.add(io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)).root
    inner = directory(store, {"pic": png})
    folder = directory(store, {"hello.txt": small, "big.bin": big, "sub": inner})
    gateway = Gateway(
        LocalContent(store.blocks), identify=Identify({token_digest("s3cret"): "alice"})
    )
    servers = HttpServers([Listener("gateway", gateway.app(), "127.0.0.1:0")])
    await servers.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Site(servers.urls["gateway"], store, big, data, small, folder, session)
    finally:
        await servers.stop()
        store.close()


async def test_file_bytes_and_headers(site: Site) -> None:
    status, headers, body = await site.get(f"/ipfs/{to_str(site.big)}")
    assert status == 200 and body == site.data
    assert headers["Content-Length"] == str(BIG)
    assert headers["ETag"] == f'"{to_str(site.big)}"'
    assert headers["Cache-Control"] == "public, max-age=29030400, immutable"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Ipfs-Path"] == f"/ipfs/{to_str(site.big)}"
    status, headers, body = await site.get(f"/ipfs/{to_str(site.small)}")
    assert body == b"hello gateway\n" and headers["Content-Type"].startswith("text/plain")
    status, headers, _ = await site.get(f"/ipfs/{to_str(site.big)}?filename=r\u00e9sum\u00e9.pdf")
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Disposition"].startswith('inline; filename="r_sum_.pdf"')
    status, headers, _ = await site.get(f"/ipfs/{to_str(site.small)}?download=true")
    assert headers["Content-Disposition"].startswith("attachment;")
    async with site.session.head(site.url + f"/ipfs/{to_str(site.big)}") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == str(BIG)
        assert await resp.read() == b""


async def test_range_requests(site: Site) -> None:
    path = f"/ipfs/{to_str(site.big)}"
    for first, last in ((0, 0), (10, 99), (MiB - 3, MiB + 7), (BIG - 5, BIG - 1)):
        status, headers, body = await site.get(path, headers={"Range": f"bytes={first}-{last}"})
        assert status == 206 and body == site.data[first : last + 1]
        assert headers["Content-Range"] == f"bytes {first}-{last}/{BIG}"
    status, headers, body = await site.get(path, headers={"Range": "bytes=-10"})
    assert status == 206 and body == site.data[-10:]
    status, headers, body = await site.get(path, headers={"Range": f"bytes={BIG - 2}-"})
    assert status == 206 and body == site.data[-2:]
    status, _, _ = await site.get(path, headers={"Range": f"bytes={BIG}-{BIG + 10}"})
    assert status == 416
    status, _, body = await site.get(path, headers={"Range": "bytes=5-1"})
    assert status == 400 and body.count(b"\n") == 1


async def test_etag_and_304(site: Site) -> None:
    path = f"/ipfs/{to_str(site.big)}"
    etag = f'"{to_str(site.big)}"'
    status, headers, body = await site.get(path, headers={"If-None-Match": etag})
    assert status == 304 and body == b"" and headers["ETag"] == etag
    status, _, _ = await site.get(path, headers={"If-None-Match": '"other", W/' + etag})
    assert status == 304
    status, _, _ = await site.get(path, headers={"If-None-Match": '"other"'})
    assert status == 200
    status, headers, _ = await site.get(path + "?format=raw")
    assert headers["ETag"] != etag
    status, _, _ = await site.get(path + "?format=raw", headers={"If-None-Match": headers["ETag"]})
    assert status == 304


async def test_raw_block_of_any_cid(site: Site) -> None:
    root_block = site.store.blocks.get(site.big)
    status, headers, body = await site.get(f"/ipfs/{to_str(site.big)}?format=raw")
    assert status == 200 and body == root_block
    assert headers["Content-Type"] == "application/vnd.ipld.raw"
    child = dagpb.decode_node(root_block).links[1].hash
    status, headers, body = await site.get(
        f"/ipfs/{to_str(child)}", headers={"Accept": "application/vnd.ipld.raw"}
    )
    assert status == 200 and body == site.data[MiB : 2 * MiB]
    assert make_cid(0x55, body) == child


async def test_car_scopes(site: Site) -> None:
    def blocks_of(body: bytes) -> tuple[list[Cid], list[Cid]]:
        roots, sections = car.read_car(io.BytesIO(body))
        return roots, [cid for cid, _ in sections]  # read_car verifies every block

    status, headers, body = await site.get(f"/ipfs/{to_str(site.big)}?format=car")
    assert status == 200
    assert headers["Content-Type"].startswith("application/vnd.ipld.car; version=1")
    roots, cids = blocks_of(body)
    assert roots == [site.big] and len(cids) == 5 and cids[0] == site.big
    out = io.BytesIO()
    site.store.export_car(site.big, out)
    assert body == out.getvalue()  # the same bytes as `cim-place export`

    status, _, body = await site.get(
        f"/ipfs/{to_str(site.folder)}/big.bin?format=car&dag-scope=block"
    )
    roots, cids = blocks_of(body)
    assert roots == [site.folder] and cids == [site.folder, site.big]
    status, _, body = await site.get(
        f"/ipfs/{to_str(site.big)}?format=car&dag-scope=entity&entity-bytes={MiB + 1}:{MiB + 2}"
    )
    roots, cids = blocks_of(body)
    leaves = [link.hash for link in dagpb.decode_node(site.store.blocks.get(site.big)).links]
    assert cids == [site.big, leaves[1]]
    status, _, body = await site.get(
        f"/ipfs/{to_str(site.big)}?format=car&dag-scope=entity&entity-bytes=-3:*"
    )
    assert blocks_of(body)[1] == [site.big, leaves[3]]
    status, _, body = await site.get(f"/ipfs/{to_str(site.folder)}?format=car&dag-scope=entity")
    assert blocks_of(body)[1] == [site.folder]
    status, _, body = await site.get(f"/ipfs/{to_str(site.folder)}?format=car")
    assert len(blocks_of(body)[1]) == 1 + 1 + 5 + 1 + 1  # folder, hello, big, sub, pic


async def test_directories(site: Site) -> None:
    status, headers, body = await site.get(f"/ipfs/{to_str(site.folder)}/hello.txt")
    assert status == 200 and body == b"hello gateway\n"
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Ipfs-Roots"] == f"{to_str(site.folder)},{to_str(site.small)}"
    status, headers, body = await site.get(f"/ipfs/{to_str(site.folder)}/sub/pic")
    assert status == 200 and headers["Content-Type"] == "image/png"
    status, headers, body = await site.get(f"/ipfs/{to_str(site.folder)}/")
    assert (
        status == 200 and b"hello.txt" in body and headers["Content-Type"].startswith("text/html")
    )
    status, _, body = await site.get(f"/ipfs/{to_str(site.folder)}/nope")
    assert status == 404 and b"nope" in body
    status, _, _ = await site.get(f"/ipfs/{to_str(site.small)}/below-a-file")
    assert status == 404


async def test_bad_requests(site: Site) -> None:
    cid = to_str(site.big)
    for path, expected in (
        ("/ipfs/notacid", 400),
        ("/ipfs/bafy%ff", 400),
        ("/ipfs/Qm" + "0" * 44, 400),
        (f"/ipfs/{cid}?format=zip", 400),
        (f"/ipfs/{cid}?format=car&dag-scope=most", 400),
        (f"/ipfs/{cid}?format=car&entity-bytes=1:2", 400),
        (f"/ipfs/{cid}?format=car&dag-scope=entity&entity-bytes=a:b", 400),
        (f"/ipfs/{cid}/%2e%2e/x", 400),
        (f"/ipfs/{to_str(make_cid(0x55, b'nobody has this'))}", 404),
        ("/ipfs/", 404),
    ):
        status, headers, body = await site.get(path)
        assert status == expected, (path, status, body)
        if status == 400:
            assert body.count(b"\n") == 1 and headers["Cache-Control"] == "no-store"
    status, _, _ = await site.get(f"/ipfs/{cid}", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, _ = await site.get(f"/ipfs/{cid}", headers={"Authorization": "Bearer s3cret"})
    assert status == 200
    async with site.session.post(site.url + f"/ipfs/{cid}") as resp:
        assert resp.status == 405


async def test_corrupt_block_is_never_served(site: Site) -> None:
    leaves = [link.hash for link in dagpb.decode_node(site.store.blocks.get(site.big)).links]
    path = site.store.blocks.block_path(leaves[2])
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    status, _, body = await site.get(f"/ipfs/{to_str(leaves[2])}?format=raw")
    assert status == 502 and bytes(damaged) not in body
    # The whole file: the first two MiB go out, then the connection is cut; never the bad bytes.
    with pytest.raises(aiohttp.ClientPayloadError):
        await site.get(f"/ipfs/{to_str(site.big)}")
    # A range that starts in the bad block fails before any header is sent.
    status, _, body = await site.get(
        f"/ipfs/{to_str(site.big)}", headers={"Range": f"bytes={2 * MiB}-{2 * MiB + 9}"}
    )
    assert status == 502 and body.count(b"\n") == 1
