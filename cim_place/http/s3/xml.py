"""S3 XML: building the answers and reading the few request bodies S3 has (pure).

Request bodies (CreateBucketConfiguration, Delete, CompleteMultipartUpload) are at most
:data:`MAX_XML_BYTES`, parsed with expat (entity expansion bounded), namespaces ignored; anything
unexpected is MalformedXML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from cim_place.http.s3.errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_XML_BYTES = 1 << 20
MAX_DELETE_KEYS = 1000


def iso(ts: float) -> str:
    """S3's timestamp in XML: 2026-12-05T14:30:00.000Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{int(ts * 1000) % 1000:03d}Z"
    )


def http_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def element(name: str, value: object) -> str:
    return f"<{name}>{escape(str(value))}</{name}>"


def document(root: str, inner: Iterable[str]) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{NS}">'
        + "".join(inner)
        + f"</{root}>"
    ).encode()


def _parse(body: bytes, root: str) -> ET.Element:
    if len(body) > MAX_XML_BYTES:
        raise S3Error("MalformedXML", f"the XML body is larger than {MAX_XML_BYTES} bytes")
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise S3Error("MalformedXML", "document type declarations are not accepted")
    try:
        tree = ET.fromstring(body)
    except ET.ParseError as exc:
        raise S3Error("MalformedXML", f"the XML body does not parse: {exc}") from None
    for node in tree.iter():
        if isinstance(node.tag, str) and "}" in node.tag:
            node.tag = node.tag.split("}", 1)[1]
    if tree.tag != root:
        raise S3Error("MalformedXML", f"expected a <{root}> document, got <{tree.tag}>")
    return tree


def _text(node: ET.Element, name: str) -> str | None:
    child = node.find(name)
    return None if child is None else (child.text or "")


def parse_location(body: bytes) -> str:
    """The LocationConstraint of a CreateBucketConfiguration ('' when absent)."""
    if not body.strip():
        return ""
    tree = _parse(body, "CreateBucketConfiguration")
    return (_text(tree, "LocationConstraint") or "").strip()


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    keys: tuple[str, ...]
    quiet: bool


def parse_delete(body: bytes) -> DeleteRequest:
    tree = _parse(body, "Delete")
    keys = []
    for obj in tree.findall("Object"):
        key = _text(obj, "Key")
        if not key:
            raise S3Error("MalformedXML", "every <Object> needs a non-empty <Key>")
        keys.append(key)
    if not keys or len(keys) > MAX_DELETE_KEYS:
        raise S3Error("MalformedXML", f"a Delete lists 1 to {MAX_DELETE_KEYS} objects")
    quiet = (_text(tree, "Quiet") or "").strip().lower() == "true"
    return DeleteRequest(tuple(keys), quiet)


@dataclass(frozen=True, slots=True)
class ListedPart:
    number: int
    etag: str


def parse_complete(body: bytes) -> list[ListedPart]:
    tree = _parse(body, "CompleteMultipartUpload")
    parts = []
    for node in tree.findall("Part"):
        number, etag = _text(node, "PartNumber"), _text(node, "ETag")
        if number is None or etag is None:
            raise S3Error("MalformedXML", "every <Part> needs <PartNumber> and <ETag>")
        try:
            value = int(number.strip())
        except ValueError:
            raise S3Error("MalformedXML", f"PartNumber {number[:20]!r} is not a number") from None
        parts.append(ListedPart(value, etag.strip().strip('"')))
    if not parts:
        raise S3Error("MalformedXML", "CompleteMultipartUpload lists no parts")
    return parts


def error_entries(errors: Sequence[tuple[str, S3Error]]) -> list[str]:
    return [
        "<Error>"
        + element("Key", key)
        + element("Code", err.code)
        + element("Message", err.message)
        + "</Error>"
        for key, err in errors
    ]
