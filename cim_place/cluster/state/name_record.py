"""A domain-wide name's rules and stored record: what a name may be and what its KV value holds.

This module owns the naming rule (``check_name``), the errors about names, ``NameRecord`` (one
revision of a name) and the JSON value stored under a name in bucket ``cim-place-names``
(``encode_record``, ``decode_record``; the layout is described in
:mod:`cim_place.cluster.state.names`, which owns every read and write of the bucket).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cim_place.cluster.nats.kv import NAMES
from cim_place.errors import CimPlaceError, InvalidCidError, TransportError
from cim_place.objectstore import cid as cids
from cim_place.objectstore.cid import Cid

__all__ = [
    "MAX_NAME_LENGTH",
    "NAME_RULE",
    "InvalidNameError",
    "NameConflictError",
    "NameRecord",
    "NamingError",
    "UnknownNameError",
    "check_name",
    "decode_record",
    "encode_record",
]

MAX_NAME_LENGTH = 255
NAME_RULE = (
    f"a name is 1-{MAX_NAME_LENGTH} characters from a-z A-Z 0-9 - _ / = . "
    "and does not start or end with '.'"
)
_NAME_CHARS = re.compile(r"[-/_=.a-zA-Z0-9]+")


class NamingError(CimPlaceError):
    """Base of the errors about domain-wide names (``NameError`` is a Python builtin)."""


class InvalidNameError(NamingError):
    """A name breaks the naming rule (it must be a valid NATS KV key)."""


class UnknownNameError(NamingError):
    """A name (or a reference that is neither a CID nor a name) is not in the domain."""


class NameConflictError(NamingError):
    """A compare-and-set write found another revision than the one expected."""


@dataclass(frozen=True, slots=True)
class NameRecord:
    """One revision of a name.

    For a removal (``removed``), ``cid`` is what the name pointed at just before, or ``b""`` when
    that is no longer known (the kept history starts after it).
    """

    name: str
    cid: Cid
    set_by: str = ""
    set_at: str = ""
    """When the writer set it, ISO 8601 UTC, by the writer's clock."""
    previous: Cid | None = None
    """What the name pointed at before this revision (None: it did not exist)."""
    note: str = ""
    revision: int = 0
    """The KV revision (stream sequence) of this record; pass it as ``expect_revision``."""
    time: datetime | None = None
    """When the hub stored this revision, by the hub's clock."""
    removed: bool = False

    @property
    def cid_text(self) -> str:
        """The CID in its canonical text form ("" when unknown)."""
        return cids.to_str(self.cid) if self.cid else ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (CIDs as text), for ``--json`` output."""
        return {
            "name": self.name,
            "cid": self.cid_text,
            "set_by": self.set_by,
            "set_at": self.set_at,
            "previous": cids.to_str(self.previous) if self.previous else None,
            "note": self.note,
            "revision": self.revision,
            "time": self.time.isoformat() if self.time else None,
            "removed": self.removed,
        }


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid name, else raise InvalidNameError stating the rule.

    A name is a NATS KV key, and must not itself read as a CID (``resolve`` would never reach it).
    """
    if not name:
        raise InvalidNameError(f"empty name: {NAME_RULE}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"name {name[:40]!r}... is {len(name)} characters long: {NAME_RULE}")
    if not _NAME_CHARS.fullmatch(name) or name.startswith(".") or name.endswith("."):
        bad = sorted({c for c in name if not _NAME_CHARS.fullmatch(c)})
        what = f" (bad characters: {''.join(bad)!r})" if bad else ""
        raise InvalidNameError(f"invalid name {name!r}{what}: {NAME_RULE}")
    if _is_cid(name):
        raise InvalidNameError(
            f"invalid name {name!r}: it reads as a CID, so it could never be looked up as a name; "
            "choose a name that is not a CID"
        )
    return name


def _is_cid(text: str) -> bool:
    try:
        cids.parse(text)
    except InvalidCidError:
        return False
    return True


def encode_record(
    cid: Cid, *, set_by: str, set_at: str, previous: Cid | None = None, note: str = ""
) -> bytes:
    """The JSON value stored under a name."""
    doc: dict[str, str] = {"cid": cids.to_str(cid), "set_by": set_by, "set_at": set_at}
    if previous:
        doc["previous"] = cids.to_str(previous)
    if note:
        doc["note"] = note
    return json.dumps(doc, sort_keys=True).encode()


def decode_record(
    name: str,
    value: bytes | None,
    *,
    revision: int,
    time: datetime | None,
    removed: bool = False,
) -> NameRecord:
    """Read a stored value; TransportError (naming the key) when cim-place did not write it."""
    where = f"{NAMES}/{name}@{revision}"
    if removed and not value:
        # A delete marker written by a generic KV tool: no body.
        return NameRecord(name, b"", revision=revision, time=time, removed=True)
    try:
        doc = json.loads(value or b"")
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        cid = cids.parse(str(doc["cid"])) if doc.get("cid") else b""
        previous = cids.parse(str(doc["previous"])) if doc.get("previous") else None
        if not cid and not removed:
            raise ValueError("no cid")
    except (ValueError, KeyError, InvalidCidError) as exc:
        raise TransportError(
            f"the stored name {where} is not readable ({exc}); set it again with "
            f"`cim-place name set {name} CID`"
        ) from None
    return NameRecord(
        name=name,
        cid=cid,
        set_by=str(doc.get("set_by", "")),
        set_at=str(doc.get("set_at", "")),
        previous=previous,
        note=str(doc.get("note", "")),
        revision=revision,
        time=time,
        removed=removed,
    )
