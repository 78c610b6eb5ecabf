"""Real IPFS clients against a node's gateway: npm ``ipfs-car`` unpacks a CAR from the gateway
to identical bytes and root, and ``@helia/verified-fetch`` (Node 22, HTTP-only Helia with the
gateway as its recursive gateway) fetches a file block by block, verifying each, from the node
that holds it and through a node that does not; a gateway that lies about one block makes it
fail instead of returning the wrong bytes.

Node 22 and the npm packages are installed on first use by ``scripts/install-node22.sh`` into
``.cache/`` (ignored by git); without npm, or when the install fails (offline), the tests skip.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from http_domain import Domain, upload_to

from cim_place.http.gateway import Gateway
from cim_place.http.server import HttpServers, Listener
from cim_place.http.sources import LocalContent
from cim_place.objectstore import dagpb
from cim_place.objectstore.cid import Cid, to_str
from cim_place.objectstore.store import ObjectStore
from cim_place.objectstore.testdata import chacha_stream

pytestmark = pytest.mark.npm

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
IPFS_CAR = "ipfs-car@3.1.0"
VERIFIED_FETCH = ("@helia/verified-fetch@8.0.4", "@helia/http@4", "helia@7")
SIZE = 3 * (1 << 20) + 11


def _install(folder: str, packages: tuple[str, ...]) -> Path:
    """The node 22 binary, with ``packages`` installed beside it (skip when impossible)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not on PATH: the gateway interop tests need it")
    dest = CACHE / folder
    marker = dest / ".installed"
    args = [] if marker.exists() and marker.read_text() == " ".join(packages) else packages
    try:
        done = subprocess.run(
            ["bash", str(REPO / "scripts/install-node22.sh"), str(dest), *args],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("installing node 22 and the npm packages timed out (offline?)")
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-2:]
        pytest.skip(f"installing node 22 failed (offline?): {' / '.join(last)}")
    marker.write_text(" ".join(packages))
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def verified_fetch() -> tuple[Path, Path]:
    """(node 22, the fetch script placed beside its node_modules)."""
    node = _install("verified-fetch", VERIFIED_FETCH)
    script = CACHE / "verified-fetch" / "verified_fetch.mjs"
    shutil.copyfile(Path(__file__).with_name("verified_fetch.mjs"), script)
    return node, script


@pytest.fixture(scope="module")
def ipfs_car() -> list[str]:
    node = _install("ipfs-car", (IPFS_CAR,))
    return [str(node), str(CACHE / "ipfs-car" / "node_modules" / "ipfs-car" / "bin.js")]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, ObjectStore, Cid, bytes]]:
    store = ObjectStore(tmp_path / "v0", fsync="none")
    data = chacha_stream("gateway-interop", SIZE).read()
    root = store.add(io.BytesIO(data)).root
    servers = HttpServers(
        [Listener("gateway", Gateway(LocalContent(store.blocks)).app(), "127.0.0.1:0")]
    )
    await servers.start()
    try:
        yield servers.urls["gateway"], store, root, data
    finally:
        await servers.stop()
        store.close()


async def _run(*command: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_ipfs_car_unpacks_the_gateways_car(
    ipfs_car: list[str], gateway: tuple[str, ObjectStore, Cid, bytes], tmp_path: Path
) -> None:
    url, _, root, data = gateway
    car = tmp_path / "from-gateway.car"
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{url}/ipfs/{to_str(root)}", headers={"Accept": "application/vnd.ipld.car"}
        ) as resp,
    ):
        assert resp.status == 200
        car.write_bytes(await resp.read())
    code, out, err = await _run(*ipfs_car, "roots", str(car))
    assert code == 0, err
    assert out.split() == [to_str(root)]
    unpacked = tmp_path / "unpacked.bin"
    code, out, err = await _run(*ipfs_car, "unpack", str(car), "--output", str(unpacked))
    assert code == 0, err
    assert unpacked.read_bytes() == data


async def test_a_directory_packed_by_ipfs_car_is_served_by_path(
    ipfs_car: list[str], gateway: tuple[str, ObjectStore, Cid, bytes], tmp_path: Path
) -> None:
    """ipfs-car packs a directory (UnixFS directories, what cim-place's importer does not make);
    imported as a CAR, its files are served by path and its listing names them."""
    url, store, _, data = gateway
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    (site / "index.html").write_bytes(b"<!doctype html><title>home</title>")
    (site / "img" / "big.bin").write_bytes(data)
    packed = tmp_path / "site.car"
    code, _, err = await _run(*ipfs_car, "pack", str(site), "--output", str(packed))
    assert code == 0, err
    with packed.open("rb") as car:
        (pin,) = store.import_car(car)
    root = to_str(pin.root)
    async with aiohttp.ClientSession(base_url=url) as http:
        async with http.get(f"/ipfs/{root}/img/big.bin") as resp:
            assert resp.status == 200 and await resp.read() == data
        async with http.get(f"/ipfs/{root}/") as resp:  # its index.html
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
            assert await resp.read() == b"<!doctype html><title>home</title>"
        async with http.get(f"/ipfs/{root}/img") as resp:  # no index: a listing
            assert resp.status == 200 and b"big.bin" in await resp.read()
        async with http.get(f"/ipfs/{root}/nothing-here") as resp:
            assert resp.status == 404


async def test_verified_fetch_through_the_gateway(
    verified_fetch: tuple[Path, Path], gateway: tuple[str, ObjectStore, Cid, bytes], tmp_path: Path
) -> None:
    node, script = verified_fetch
    url, _, root, data = gateway
    out = tmp_path / "fetched.bin"
    code, stdout, stderr = await _run(str(node), str(script), url, to_str(root), str(out))
    assert code == 0, stderr + stdout
    assert json.loads(stdout.strip().splitlines()[-1]) == {"status": 200, "bytes": SIZE}
    assert out.read_bytes() == data


async def test_verified_fetch_of_content_on_another_node(
    verified_fetch: tuple[Path, Path], domain: Domain, tmp_path: Path
) -> None:
    """Held by node A only; the client walks the DAG block by block through node B's gateway,
    which fetches each from A through the domain."""
    node, script = verified_fetch
    data = chacha_stream("gateway-interop-domain", SIZE).read()
    root = await upload_to(domain, "node-a", data)
    out = tmp_path / "fetched.bin"
    code, stdout, stderr = await _run(
        str(node), str(script), domain.url(domain.b), to_str(root), str(out)
    )
    assert code == 0, stderr + stdout
    assert out.read_bytes() == data
    assert domain.b.pinned_on(root) is None  # served through the cache, not pinned


async def test_verified_fetch_refuses_a_lying_gateway(
    verified_fetch: tuple[Path, Path], gateway: tuple[str, ObjectStore, Cid, bytes], tmp_path: Path
) -> None:
    """A proxy that flips one byte of one leaf: the client must not hand out those bytes."""
    node, script = verified_fetch
    url, store, root, data = gateway
    bad = to_str(dagpb.decode_node(store.blocks.get(root)).links[1].hash)

    async def lie(request: web.Request) -> web.StreamResponse:
        async with (
            aiohttp.ClientSession() as http,
            http.get(url + request.path_qs, headers=request.headers) as resp,
        ):
            body = bytearray(await resp.read())
            if bad in request.path and body:
                body[0] ^= 0xFF
            headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-length"}
            headers.pop("Transfer-Encoding", None)
            return web.Response(status=resp.status, body=bytes(body), headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", lie)
    async with HttpServers([Listener("liar", app, "127.0.0.1:0")]) as liar:
        out = tmp_path / "fetched.bin"
        code, stdout, stderr = await _run(
            str(node), str(script), liar.urls["liar"], to_str(root), str(out)
        )
    # The client verifies each block: the lie ends the fetch (an error, or node 22 giving up on
    # the body it can never complete: exit 13), and no byte of the tampered block is handed out.
    lines = stdout.strip().splitlines()
    if code == 0:
        assert json.loads(lines[-1]).get("status") != 200, (stdout, stderr[-2000:])
    assert not out.exists() or out.read_bytes() != _tampered(data)
    assert not out.exists() or _tampered(data)[1 << 20 : (1 << 20) + 64] not in out.read_bytes()


def _tampered(data: bytes) -> bytes:
    tampered = bytearray(data)
    tampered[1 << 20] ^= 0xFF
    return bytes(tampered)
