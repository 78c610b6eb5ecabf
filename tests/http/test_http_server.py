"""The listeners and the identity hook: HTTPS, client certificates and bearer tokens as
identities, the owner/readers rule of a secured domain (from the local pin, or the locations
record for content held elsewhere), and clear errors for bad settings."""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cim_place.cluster.exchange.fetch_model import Labels
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.subjects import Subjects
from cim_place.cluster.state.locations import LocationStore
from cim_place.http.gateway import Gateway
from cim_place.http.node import DomainAccess, NodeParts
from cim_place.http.server import HttpConfigError, HttpServers, Listener, TlsFiles, parse_listen
from cim_place.http.sources import Identify, LocalContent, token_digest
from cim_place.interfaces import Pin
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import Cid, make_cid, to_str
from cim_place.objectstore.store import ObjectStore
from cim_place.placement.status import ObjectStatus


def _cert(
    directory: Path,
    name: str,
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer[0].subject if issuer else subject_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@dataclass
class Secured:
    url: str
    tls: Path
    public: Cid
    owned: Cid

    def client(self, user: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.tls / "ca.pem"))
        if user is not None:
            context.load_cert_chain(
                str(self.tls / f"{user}.pem"), str(self.tls / f"{user}-key.pem")
            )
        return context

    async def status(self, cid: Cid, user: str | None = None, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{self.url}/ipfs/{to_str(cid)}", ssl=self.client(user), headers=headers
            ) as resp,
        ):
            await resp.read()
            return resp.status


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    tls = tmp_path / "tls"
    tls.mkdir()
    ca = _cert(tls, "ca", "cim-place test CA", None)
    for name in ("server", "alice", "bob", "carol"):
        _cert(tls, name, name, ca)
    store = ObjectStore(tmp_path / "v0", fsync="none")
    public = store.add(io.BytesIO(b"for everyone\n")).root
    owned = store.add(
        io.BytesIO(b"alice's, carol may read\n"), owner="alice", metadata={"readers": "carol"}
    ).root

    def pin_of(root: Cid) -> Pin | None:
        return store.pins.get(root)

    parts = NodeParts(
        nc=None,
        node="node-a",
        subjects=Subjects(),
        hub_domain="hub",
        blocks=store.blocks,
        stores=[store],
        cache_volume=lambda: store,
        pin_of=pin_of,
        near=Labels(),
        stream_tls=None,
        secured=True,
    )
    gateway = Gateway(
        LocalContent(store.blocks),
        access=DomainAccess(parts),
        identify=Identify({token_digest("bob-token"): "bob", token_digest("alice-token"): "alice"}),
    )
    files = TlsFiles(tls / "server.pem", tls / "server-key.pem", tls / "ca.pem")
    async with HttpServers([Listener("gateway", gateway.app(), "127.0.0.1:0", files)]) as servers:
        assert servers.urls["gateway"].startswith("https://127.0.0.1:")
        yield Secured(servers.urls["gateway"], tls, public, owned)
    store.close()


async def test_https_with_client_certificates_and_tokens(secured: Secured) -> None:
    assert await secured.status(secured.public) == 200
    assert await secured.status(secured.owned) == 401  # anonymous
    assert await secured.status(secured.owned, user="alice") == 200  # the owner, by certificate
    assert await secured.status(secured.owned, user="carol") == 200  # a reader
    assert await secured.status(secured.owned, user="bob") == 403
    assert await secured.status(secured.owned, token="alice-token") == 200
    assert await secured.status(secured.owned, token="bob-token") == 403
    assert await secured.status(secured.owned, token="nobody's") == 401
    assert await secured.status(secured.public, user="bob") == 200


async def test_bad_settings_are_refused_clearly(tmp_path: Path) -> None:
    for text in ("1.2.3.4", "host:port", ":80", "::1:80", "[::1:80", "127.0.0.1:70000"):
        with pytest.raises(HttpConfigError) as caught:
            parse_listen(text)
        assert "\n" not in str(caught.value)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    app = Gateway(LocalContent(ObjectStore(tmp_path / "v", fsync="none").blocks)).app()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HttpConfigError, match="cannot listen for gateway"):
            await HttpServers([Listener("gateway", app, f"127.0.0.1:{port}")]).start()
    missing = TlsFiles(tmp_path / "none.pem", tmp_path / "none-key.pem")
    app = Gateway(LocalContent(ObjectStore(tmp_path / "w", fsync="none").blocks)).app()
    with pytest.raises(HttpConfigError, match="cannot load the HTTP TLS certificate"):
        await HttpServers([Listener("gateway", app, "127.0.0.1:0", missing)]).start()


async def test_owner_and_readers_of_content_held_elsewhere_come_from_locations(
    hub1: Hub, tmp_path: Path
) -> None:
    """A node that does not hold an object judges by the controller's locations record."""
    owned = make_cid(0x55, b"held by another node")
    public = make_cid(0x55, b"public, held by another node")
    async with connected(hub1.url) as nc:
        locations = await LocationStore(jetstream(nc, "hub")).open(create=True, replicas=1)
        await locations.put(
            ObjectStatus(
                cid=to_str(owned), state="placed", owner="alice", metadata={"readers": "carol"}
            )
        )
        await locations.put(ObjectStatus(cid=to_str(public), state="placed"))
        store = ObjectStore(tmp_path / "v0", fsync="none")
        parts = NodeParts(
            nc=nc,
            node="node-b",
            subjects=Subjects(),
            hub_domain="hub",
            blocks=store.blocks,
            stores=[store],
            cache_volume=lambda: store,
            pin_of=lambda _root: None,
            near=Labels(),
            stream_tls=None,
            secured=True,
        )
        access = DomainAccess(parts)
        assert await access.may_read("alice", owned)
        assert await access.may_read("carol", owned)
        assert not await access.may_read("bob", owned)
        assert not await access.may_read(None, owned)
        assert await access.may_read(None, public)
        assert not await access.may_read("alice", make_cid(0x55, b"nobody knows this"))
        store.close()
