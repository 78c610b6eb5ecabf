"""CIDs as bytes and the dag-pb codec, checked against multiformats and the IPFS vectors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multiformats import CID

from cim_place.errors import CorruptBlockError, InvalidCidError
from cim_place.objectstore import cid as cids
from cim_place.objectstore import dagpb


@given(st.binary(max_size=256), st.sampled_from([cids.RAW, cids.DAG_PB, cids.DAG_CBOR]))
def test_text_form_matches_multiformats(data: bytes, codec: int) -> None:
    cid = cids.make_cid(codec, data)
    text = cids.to_str(cid)
    assert text == CID.decode(cid).encode("base32")
    assert cids.parse(text) == cid


@given(st.binary(max_size=256))
def test_cid_v0_round_trip(data: bytes) -> None:
    cid = cids.make_cid(cids.DAG_PB, data, version=0)
    text = cids.to_str(cid)
    assert text.startswith("Qm")
    assert text == str(CID.decode(cid))
    assert cids.parse(text) == cid
    assert cids.split(cid)[:2] == (0, cids.DAG_PB)


def test_parse_accepts_other_multibases() -> None:
    cid = cids.make_cid(cids.RAW, b"hello world")
    assert cids.parse(CID.decode(cid).encode("base58btc")) == cid


@pytest.mark.parametrize("text", ["", "Qm123", "bafy!!!", "zzzz", "hello", "b" + "a" * 10])
def test_malformed_cid_strings_are_refused_with_a_hint(text: str) -> None:
    with pytest.raises(InvalidCidError, match="CID"):
        cids.parse(text)


def test_verify_detects_a_flipped_byte() -> None:
    cid = cids.make_cid(cids.RAW, b"payload")
    cids.verify(cid, b"payload")
    with pytest.raises(CorruptBlockError, match=cids.to_str(cid)):
        cids.verify(cid, b"paylaod")


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_round_trip(n: int) -> None:
    encoded = cids.varint(n)
    assert cids.read_varint(encoded) == (n, len(encoded))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"),
        ("hello world", "Qmf412jQZiuVUtdgnB36FXFX7xg5V6KEbSJ4dpQuhkLyfD"),
        ("Hello Worlds!\n", "QmVr26fY1tKyspEJBniVhqxQeEjhF78XerGiqWAwraVLQH"),
    ],
)
def test_single_block_unixfs_files_match_ipfs(text: str, expected: str) -> None:
    data = text.encode()
    unixfs = dagpb.UnixFSData(dagpb.UNIXFS_FILE, data or None, len(data))
    block = dagpb.encode_node(dagpb.PBNode((), dagpb.encode_unixfs(unixfs)))
    assert cids.to_str(cids.make_cid(cids.DAG_PB, block, version=0)) == expected
    decoded = dagpb.decode_unixfs(dagpb.decode_node(block).data or b"")
    assert decoded.data == (data or None)
    assert decoded.filesize == len(data)


links = st.builds(
    dagpb.PBLink,
    st.binary(min_size=1, max_size=40),
    st.one_of(st.none(), st.text(max_size=10)),
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
)


@given(st.lists(links, max_size=5).map(tuple), st.one_of(st.none(), st.binary(max_size=64)))
def test_dag_pb_round_trip(node_links: tuple[dagpb.PBLink, ...], data: bytes | None) -> None:
    node = dagpb.PBNode(node_links, data)
    assert dagpb.decode_node(dagpb.encode_node(node)) == node


@given(st.binary(max_size=64))
def test_garbage_never_decodes_silently_into_something_else(garbage: bytes) -> None:
    try:
        node = dagpb.decode_node(garbage)
    except (ValueError, UnicodeDecodeError):
        return
    assert dagpb.encode_node(node) == garbage or garbage == b""


def test_the_text_form_is_the_same_for_bytes_and_for_views_of_them() -> None:
    cid = cids.make_cid(cids.RAW, b"named often")
    text = cids.to_str(cid)
    assert cids.to_str(cid) == text  # remembered
    assert cids.to_str(bytearray(cid)) == cids.to_str(memoryview(cid)) == text  # type: ignore[arg-type]
