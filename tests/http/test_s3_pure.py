"""The pure parts of the S3 API, without NATS: SigV4 against botocore's signer, ranges,
conditionals, listing pages, XML bodies, domain names of keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from cim_place.http.s3.context import domain_name
from cim_place.http.s3.errors import S3Error
from cim_place.http.s3.listing import Page, page
from cim_place.http.s3.ranges import check_conditions, parse_range
from cim_place.http.s3.sigv4 import parse_authorization, parse_query, verify
from cim_place.http.s3.xml import parse_complete, parse_delete

SECRET = "s3cr3t"


def signed(url: str, body: bytes = b"", secret: str = SECRET) -> AWSRequest:
    request = AWSRequest(method="PUT", url=url, data=body)
    S3SigV4Auth(Credentials("AKID", secret), "s3", "eu-west-1").add_auth(request)
    return request


def check(request: AWSRequest, secret: str = SECRET) -> None:
    raw = request.url.split("127.0.0.1:9000", 1)[1]
    raw_path, _, raw_query = raw.partition("?")
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers["host"] = "127.0.0.1:9000"
    claim = parse_authorization(headers["authorization"], headers)
    verify(claim, secret, "PUT", raw_path, parse_query(raw_query), headers, datetime.now(UTC))


def test_sigv4_matches_botocore() -> None:
    request = signed(
        "http://127.0.0.1:9000/b/a%20b%2Bc/%C3%A9.txt?partNumber=1&uploadId=x%20y", b"hi"
    )
    check(request)
    with pytest.raises(S3Error) as exc:
        check(request, "wrong")
    assert exc.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as exc:
        parse_authorization("AWS AKID:sig", {})
    assert exc.value.code == "InvalidRequest"


def test_ranges() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=5-", 100) == (5, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("items=0-1", 100) is None
    with pytest.raises(S3Error):
        parse_range("bytes=100-", 100)


def test_conditions() -> None:
    assert check_conditions({"if-match": '"e"'}, "e", 0) is None
    assert check_conditions({"if-match": '"x"'}, "e", 0) == 412
    assert check_conditions({"if-none-match": '"e"'}, "e", 0) == 304
    old = "Mon, 01 Jan 2024 00:00:00 GMT"
    assert check_conditions({"if-modified-since": old}, "e", 1.0e9) == 304
    assert check_conditions({"if-unmodified-since": old}, "e", 2.0e9) == 412


def test_listing_pages_with_delimiter() -> None:
    keys = ["a/1", "a/2", "b", "c/1", "d"]
    first = page(keys, prefix="", delimiter="/", after="", max_keys=2)
    assert (first.keys, first.prefixes, first.truncated) == (("b",), ("a/",), True)
    second = page(keys, prefix="", delimiter="/", after=first.last, max_keys=2)
    assert (second.keys, second.prefixes, second.truncated) == (("d",), ("c/",), False)


def scan_page(keys: list[str], *, prefix: str, delimiter: str, after: str, max_keys: int) -> Page:
    """A page by a scan of every key: what the ordered page must equal."""
    if max_keys == 0:
        return Page((), (), False, "")
    out: list[str] = []
    prefixes: list[str] = []
    last = ""
    skip_under = after if delimiter and after.endswith(delimiter) else ""
    for key in keys:
        if not key.startswith(prefix) or (after and key <= after):
            continue
        if skip_under and key.startswith(skip_under):
            continue
        entry, is_prefix = key, False
        if delimiter and (cut := key.find(delimiter, len(prefix))) >= 0:
            entry, is_prefix = key[: cut + len(delimiter)], True
        if is_prefix and prefixes and prefixes[-1] == entry:
            continue
        if len(out) + len(prefixes) >= max_keys:
            return Page(tuple(out), tuple(prefixes), True, last)
        (prefixes if is_prefix else out).append(entry)
        last = entry
        if is_prefix:
            skip_under = entry
    return Page(tuple(out), tuple(prefixes), False, last)


_ALPHABET = st.sampled_from(["a", "b", "/", "-", "é", "\U0001f600", "~"])


@settings(max_examples=300, deadline=None)
@given(
    keys=st.sets(st.text(_ALPHABET, min_size=1, max_size=6), max_size=40),
    prefix=st.text(_ALPHABET, max_size=2),
    delimiter=st.sampled_from(["", "/", "-", "ab"]),
    after=st.text(_ALPHABET, max_size=4),
    max_keys=st.integers(0, 6),
)
def test_ordered_pages_equal_a_scan(
    keys: set[str], prefix: str, delimiter: str, after: str, max_keys: int
) -> None:
    ordered = sorted(keys, key=lambda k: k.encode())
    assert ordered == sorted(keys)  # str order is UTF-8 byte order
    expected = scan_page(
        ordered, prefix=prefix, delimiter=delimiter, after=after, max_keys=max_keys
    )
    got = page(ordered, prefix=prefix, delimiter=delimiter, after=after, max_keys=max_keys)
    assert got == expected
    # Walking every page from the start lists each key or common prefix once, in order.
    seen: list[str] = []
    resume = ""
    while True:
        step = page(ordered, prefix=prefix, delimiter=delimiter, after=resume, max_keys=3)
        seen += list(step.keys) + list(step.prefixes)
        if not step.truncated:
            break
        resume = step.last
    full = scan_page(ordered, prefix=prefix, delimiter=delimiter, after="", max_keys=10**6)
    assert sorted(seen) == sorted(full.keys + full.prefixes)


def test_xml_bodies() -> None:
    parts = parse_complete(
        b'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b'<Part><PartNumber>1</PartNumber><ETag>"ab"</ETag></Part></CompleteMultipartUpload>'
    )
    assert [(p.number, p.etag) for p in parts] == [(1, "ab")]
    assert parse_delete(b"<Delete><Object><Key>k</Key></Object></Delete>").keys == ("k",)
    for bad in (b"", b"<x/>", b"<Delete/>", b'<!DOCTYPE a [<!ENTITY b "c">]><Delete/>'):
        with pytest.raises(S3Error) as exc:
            parse_delete(bad)
        assert exc.value.code == "MalformedXML"


def test_domain_names() -> None:
    assert domain_name("shop", "img/a.png") == "shop/img/a.png"
    assert domain_name("shop", "a b+c") == "shop/a=20b=2Bc"
    assert domain_name("shop", "x..y.") == "shop/x.=2Ey=2E"
    assert domain_name("shop", "k" * 300) is None
