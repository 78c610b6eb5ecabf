"""Domain-wide names: the registry on real servers (hub, leaf, lone server) and `cim-place name`."""

from __future__ import annotations

import asyncio
import itertools
import json

import nats.js.errors
import pytest
from typer.testing import CliRunner

from cim_place.cli.app import app
from cim_place.cluster.nats.connection import connected, jetstream
from cim_place.cluster.nats.kv import NAMES
from cim_place.cluster.state.name_record import (
    MAX_NAME_LENGTH,
    InvalidNameError,
    NameConflictError,
    UnknownNameError,
    check_name,
)
from cim_place.cluster.state.names import NameRegistry
from cim_place.errors import InvalidCidError, TransportError
from cim_place.local.server_spec import free_port
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub
from cim_place.objectstore.cid import DAG_PB, RAW, make_cid, to_str
from cim_place.testing import LeafFactory

CID_A = make_cid(RAW, b"a")
CID_B = make_cid(RAW, b"b")
CID_V0 = make_cid(DAG_PB, b"c", version=0)


# -- the naming rule -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["site", "docs/q3.pdf", "a-b_c=d", "v1.2.3", "x" * MAX_NAME_LENGTH, "A/b/C"]
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "empty name"),
        ("has space", "bad characters: ' '"),
        ("star*", "bad characters: '*'"),
        ("gt>", "bad characters: '>'"),
        ("caf\u00e9", "bad characters: '\u00e9'"),
        (".hidden", "does not start or end with '.'"),
        ("trailing.", "does not start or end with '.'"),
        ("x" * (MAX_NAME_LENGTH + 1), f"is {MAX_NAME_LENGTH + 1} characters long"),
        (to_str(CID_A), "reads as a CID"),
        (to_str(CID_V0), "reads as a CID"),
    ],
)
def test_invalid_names_state_the_rule(name: str, says: str) -> None:
    with pytest.raises(InvalidNameError) as caught:
        check_name(name)
    message = str(caught.value)
    assert says in message
    if "CID" not in says:
        assert "a-z A-Z 0-9 - _ / = ." in message


# -- the registry on a hub -----------------------------------------------------------------------
async def test_set_get_resolve_ls_history_rm(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        names = NameRegistry(jetstream(nc, "hub"))
        first = await names.set("site", CID_A, by="ana", note="launch")
        record = await names.get("site")
        assert record is not None
        assert (record.cid, record.set_by, record.note, record.revision) == (
            CID_A,
            "ana",
            "launch",
            first,
        )
        assert record.previous is None and record.time is not None and record.set_at

        second = await names.set("site", to_str(CID_B), by="bo")
        assert second > first
        record = await names.get("site")
        assert record is not None and record.cid == CID_B and record.previous == CID_A

        # Many names may point at one CID.
        await names.set("docs/latest", CID_B)
        await names.set("docs/v1", CID_A)
        assert await names.resolve("docs/latest") == CID_B
        assert await names.resolve(to_str(CID_A)) == CID_A  # a CID is itself
        assert await names.resolve(to_str(CID_V0)) == CID_V0

        listed = await names.ls()
        assert [(r.name, r.cid) for r in listed] == [
            ("docs/latest", CID_B),
            ("docs/v1", CID_A),
            ("site", CID_B),
        ]
        assert [r.name for r in await names.ls("docs/")] == ["docs/latest", "docs/v1"]
        assert await names.ls("nothing") == []

        removed_at = await names.rm("site", by="cy")
        assert await names.get("site") is None
        assert [r.name for r in await names.ls()] == ["docs/latest", "docs/v1"]
        with pytest.raises(UnknownNameError, match="name 'site' was removed by cy; it pointed at"):
            await names.resolve("site")

        third = await names.set("site", CID_A, by="ana")
        history = await names.history("site")
        assert [(h.revision, h.cid, h.removed, h.set_by) for h in history] == [
            (first, CID_A, False, "ana"),
            (second, CID_B, False, "bo"),
            (removed_at, CID_B, True, "cy"),
            (third, CID_A, False, "ana"),
        ]
        assert all(h.time is not None for h in history)
        # Re-created after a removal: it did not exist just before.
        assert history[-1].previous is None
        assert history[1].to_dict()["previous"] == to_str(CID_A)


async def test_compare_and_set(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        names = NameRegistry(jetstream(nc, "hub"))
        rev = await names.set("release", CID_A, expect_revision=0)
        with pytest.raises(NameConflictError, match="expected not to exist"):
            await names.set("release", CID_B, expect_revision=0)
        with pytest.raises(NameConflictError, match=f"it is at revision {rev}"):
            await names.set("release", CID_B, expect_revision=rev + 100)
        rev2 = await names.set("release", CID_B, expect_revision=rev)
        with pytest.raises(NameConflictError):
            await names.rm("release", expect_revision=rev)
        await names.rm("release", expect_revision=rev2)
        # Removed: "must not exist" holds again.
        await names.set("release", CID_A, expect_revision=0)


async def test_concurrent_setters_each_record_the_true_previous(hub1: Hub) -> None:
    targets = [make_cid(RAW, bytes([i])) for i in range(8)]
    async with connected(hub1.url) as nc:
        names = NameRegistry(jetstream(nc, "hub"))
        await names.set("busy", targets[0])
        await asyncio.gather(*(names.set("busy", cid) for cid in targets[1:]))
        history = await names.history("busy")
    assert len(history) == len(targets)
    for before, after in itertools.pairwise(history):
        assert after.previous == before.cid


async def test_errors_are_clear(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        names = NameRegistry(jetstream(nc, "hub"))
        with pytest.raises(InvalidCidError, match=r"is not a valid CID.*a CID looks like Qm"):
            await names.set("x", "not-a-cid")
        with pytest.raises(InvalidCidError):
            await names.set("x", b"\x01\x55\x12\x20short")
        with pytest.raises(InvalidNameError, match="bad characters"):
            await names.set("a b", CID_A)
        with pytest.raises(InvalidNameError):
            await names.get("a*")
        with pytest.raises(UnknownNameError) as caught:
            await names.resolve("nope")
        assert str(caught.value) == "no name or CID `nope`; list names with `cim-place name ls`"
        with pytest.raises(UnknownNameError, match="no name or CID `a b`"):
            await names.resolve("a b")
        with pytest.raises(UnknownNameError, match="no name `nope`"):
            await names.rm("nope")


async def test_writes_by_generic_kv_tools(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        js = jetstream(nc, "hub")
        names = NameRegistry(js)
        await names.set("site", CID_A)
        kv = await js.key_value(NAMES)
        await kv.delete("site")  # a plain delete marker, no body
        assert await names.get("site") is None
        history = await names.history("site")
        assert [(h.cid, h.removed) for h in history] == [(CID_A, False), (CID_A, True)]
        await names.set("site", CID_B)  # compare-and-set against the plain marker
        assert await names.resolve("site") == CID_B

        await kv.put("junk", b"not json")
        with pytest.raises(TransportError, match=r"cim-place-names/junk@\d+ is not readable"):
            await names.get("junk")
        assert [r.name for r in await names.ls()] == ["site"]


async def test_readers_do_not_create_the_bucket(hub1: Hub) -> None:
    async with connected(hub1.url) as nc:
        js = jetstream(nc, "hub")
        names = NameRegistry(js)
        assert await names.get("site") is None
        assert await names.ls() == []
        assert await names.history("site") == []
        with pytest.raises(UnknownNameError):
            await names.rm("site")
        with pytest.raises(nats.js.errors.BucketNotFoundError):
            await js.key_value(NAMES)
        await names.set("site", CID_A)
        status = await (await js.key_value(NAMES)).status()
        assert status.history == 64


async def test_names_from_a_leaf_live_in_the_hub_domain(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf1")
    async with connected(hub1.url) as hub_nc:
        await NameRegistry(jetstream(hub_nc, "hub")).set("site", CID_A, by="hub")
    async with connected(leaf.url) as leaf_nc:
        names = NameRegistry(jetstream(leaf_nc, "hub"))
        assert await names.resolve("site") == CID_A
        await names.set("site", CID_B, by="leaf")
        await names.set("from-leaf", CID_A)
        assert [r.name for r in await names.ls()] == ["from-leaf", "site"]
        await names.rm("from-leaf")
        assert [h.set_by for h in await names.history("site")] == ["hub", "leaf"]
        # Nothing was written into the leaf's own domain.
        with pytest.raises(nats.js.errors.BucketNotFoundError):
            await jetstream(leaf_nc).key_value(NAMES)
    async with connected(hub1.url) as hub_nc:
        names = NameRegistry(jetstream(hub_nc, "hub"))
        assert await names.resolve("site") == CID_B
        assert await names.get("from-leaf") is None


# -- the CLI ---------------------------------------------------------------------------------------
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["name", *args], env={"CIM_PLACE_SERVER": ""})
    return result.exit_code, result.stdout, result.stderr


def test_cli_set_get_ls_history_rm(hub1: Hub) -> None:
    server = ["--server", hub1.url]
    code, out, err = cli("ls", *server)
    assert code == 0 and out == "" and "no names" in err

    code, out, err = cli("set", "site", to_str(CID_A), "--note", "launch", *server)
    assert code == 0, err
    assert out.startswith(f"site -> {to_str(CID_A)} (revision ")
    code, out, _ = cli("set", "site", to_str(CID_B), *server)
    assert code == 0

    code, out, _ = cli("get", "site", *server)
    assert code == 0 and out == to_str(CID_B) + "\n"  # only the CID: scripts use it
    code, out, _ = cli("get", "site", "--json", *server)
    assert json.loads(out)["previous"] == to_str(CID_A)

    code, out, _ = cli("ls", *server)
    assert code == 0 and out.startswith(f"site  {to_str(CID_B)}")
    code, out, _ = cli("ls", "--json", *server)
    assert [(r["name"], r["cid"]) for r in json.loads(out)] == [("site", to_str(CID_B))]

    code, out, _ = cli("rm", "site", *server)
    assert code == 0 and out.startswith("removed site (revision ")
    code, _, err = cli("get", "site", *server)
    assert code == 1 and err == "error: no name `site`; list names with `cim-place name ls`\n"
    code, _, err = cli("rm", "site", *server)
    assert code == 1 and "no name `site`" in err

    code, out, _ = cli("history", "site", "--json", *server)
    history = json.loads(out)
    assert [(h["cid"], h["removed"], h["note"]) for h in history] == [
        (to_str(CID_A), False, "launch"),
        (to_str(CID_B), False, ""),
        (to_str(CID_B), True, ""),
    ]
    code, out, _ = cli("history", "site", *server)
    assert code == 0 and [line.split()[1] for line in out.splitlines()] == [
        "set",
        "set",
        "removed",
    ]
    code, _, err = cli("history", "never", *server)
    assert code == 1 and "has no history" in err


def test_cli_compare_and_set(hub1: Hub) -> None:
    server = ["--server", hub1.url]
    code, _, _ = cli("set", "once", to_str(CID_A), "--if-revision", "0", *server)
    assert code == 0
    code, _, err = cli("set", "once", to_str(CID_B), "--if-revision", "0", *server)
    assert code == 1 and err.startswith("error: name 'once' was expected not to exist")


def test_cli_refuses_bad_names_and_cids_in_one_line(hub1: Hub) -> None:
    server = ["--server", hub1.url]
    code, _, err = cli("set", "bad name", to_str(CID_A), *server)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: invalid name 'bad name' (bad characters: ' ')")
    code, _, err = cli("set", "ok", "Qmnotacid", *server)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: 'Qmnotacid' is not a valid CID")


def test_cli_through_a_leaf_uses_the_hub_domain(hub1: Hub, leaf_factory: LeafFactory) -> None:
    leaf = leaf_factory("leaf2")
    code, _, err = cli("set", "site", to_str(CID_A), "--server", leaf.url)
    assert code == 0, err
    code, out, _ = cli("get", "site", "--server", hub1.url)
    assert code == 0 and out.strip() == to_str(CID_A)

    async def in_leaf_domain() -> bool:
        async with connected(leaf.url) as nc:
            try:
                await jetstream(nc).key_value(NAMES)
            except nats.js.errors.BucketNotFoundError:
                return False
            return True

    assert not asyncio.run(in_leaf_domain())
    # --domain overrides: the leaf's own domain has no such name.
    code, _, err = cli("get", "site", "--server", leaf.url, "--domain", "leaf2")
    assert code == 1 and "no name `site`" in err


def test_cli_on_a_lone_server_uses_its_own_domain(nats_server: NatsServer) -> None:
    code, _, err = cli("set", "site", to_str(CID_A), "--server", nats_server.url)
    assert code == 0, err
    code, out, _ = cli("get", "site", "--server", nats_server.url)
    assert code == 0 and out.strip() == to_str(CID_A)


def test_cli_unreachable_domain_is_one_line_naming_the_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    code, out, err = cli("get", "site", "--server", url)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: cannot reach a cim-place domain at {url}")


def test_cli_checks_names_and_cids_before_connecting() -> None:
    nowhere = ["--server", f"nats://127.0.0.1:{free_port()}"]
    for args in (("get", "a*"), ("history", ".x"), ("rm", "a b"), ("set", "a*", to_str(CID_A))):
        code, _, err = cli(*args, *nowhere)
        assert code == 1 and err.startswith("error: invalid name"), (args, err)
    code, _, err = cli("set", "ok", "bafy-nope", *nowhere)
    assert code == 1 and err.startswith("error: 'bafy-nope' is not a valid CID")


def test_cli_on_a_leaf_cut_from_its_hub_refuses_to_use_the_leafs_domain(
    hub1: Hub, leaf_factory: LeafFactory
) -> None:
    leaf = leaf_factory("leaf3", via_proxy=True)
    code, _, err = cli("set", "site", to_str(CID_A), "--server", leaf.url)
    assert code == 0, err
    assert leaf.link is not None
    leaf.link.cut()
    code, out, err = cli("get", "site", "--server", leaf.url)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "error: JetStream domain 'hub' is not reachable from leaf3 (domain 'leaf3'): its link "
        "to the hub may be down; connect to a hub server, or pass --domain"
    ]
