"""One authenticated S3 request, parsed (what every handler receives)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from cim_place.http.s3.sigv4 import SignedRequest


@dataclass(frozen=True, slots=True)
class S3Request:
    http: web.Request
    bucket: str
    key: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Lower-case names; repeated headers joined with ','."""
    claim: SignedRequest
    signing_key: bytes
    access_key: str
