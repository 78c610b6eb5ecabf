"""AWS Signature Version 4 as an S3 server checks it: pure functions, no I/O.

Three ways a request is signed, all supported:

- the ``Authorization`` header (``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=...,
  Signature=...``), with ``x-amz-content-sha256`` holding the body's SHA-256, ``UNSIGNED-PAYLOAD``,
  or ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` (aws-chunked body, each chunk signed with the
  previous signature as seed: :class:`ChunkSigner`);
- a presigned URL (``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``, ``X-Amz-Expires``,
  ``X-Amz-SignedHeaders``, ``X-Amz-Signature`` in the query; the payload is unsigned).

SigV2 (``AWS AKID:sig`` headers, ``Signature=`` presigned URLs) is refused: it needs no region and
signs less of the request; boto3 presigns with SigV4 once configured with
``signature_version='s3v4'``.

The server never trusts the client's idea of the canonical form: it rebuilds the canonical URI
and query from the raw request (decoded once, then encoded the AWS way) and signs the headers the
client listed, so a client that escapes differently but consistently still verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

from cim_place.http.s3.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW = timedelta(minutes=15)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600

_CREDENTIAL = re.compile(r"^([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Credential:
    access_key: str
    date: str
    """yyyymmdd of the scope."""
    region: str
    service: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a request claims: who signed it, when, which headers, and the signature."""

    credential: Credential
    amz_date: str
    signed_headers: tuple[str, ...]
    signature: str
    payload_hash: str
    """A hex SHA-256, UNSIGNED-PAYLOAD or one of the streaming modes."""
    presigned: bool = False
    expires: int = 0


def uri_encode(text: str, *, keep_slash: bool) -> str:
    """AWS's URI encoding: everything but ``A-Za-z0-9-._~`` (and ``/`` in paths) as %XX."""
    return quote(text, safe="/~" if keep_slash else "~")


def canonical_uri(raw_path: str) -> str:
    """The canonical URI of a raw (still percent-encoded) request path; S3 encodes it once."""
    return uri_encode(unquote(raw_path), keep_slash=True) or "/"


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """(name, value) pairs of a raw query string, decoded once (``+`` stays a plus sign)."""
    pairs: list[tuple[str, str]] = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def canonical_query(pairs: Sequence[tuple[str, str]], *, skip: str = "") -> str:
    encoded = sorted(
        (uri_encode(k, keep_slash=False), uri_encode(v, keep_slash=False))
        for k, v in pairs
        if k != skip
    )
    return "&".join(f"{k}={v}" for k, v in encoded)


def _trim(value: str) -> str:
    return " ".join(value.strip().split())


def canonical_request(
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    payload_hash: str,
    *,
    skip_query: str = "",
) -> str:
    """The canonical request; ``headers`` maps lower-case names to values (joined by ',')."""
    lines = []
    for name in signed_headers:
        if name not in headers:
            raise S3Error(
                "AccessDenied", f"signed header {name!r} is not in the request", status=403
            )
        lines.append(f"{name}:{_trim(headers[name])}\n")
    return "\n".join(
        [
            method,
            canonical_uri(raw_path),
            canonical_query(query, skip=skip_query),
            "".join(lines),
            ";".join(signed_headers),
            payload_hash,
        ]
    )


def signing_key(secret: str, credential: Credential) -> bytes:
    key = _hmac(("AWS4" + secret).encode(), credential.date)
    for part in (credential.region, credential.service, "aws4_request"):
        key = _hmac(key, part)
    return key


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    # aiohttp decodes header bytes that are not UTF-8 as surrogates: sign the bytes sent.
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def parse_amz_date(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise S3Error(
            "AccessDenied", f"X-Amz-Date {text[:32]!r} is not yyyymmddThhmmssZ", status=403
        ) from None


def _credential(text: str) -> Credential:
    match = _CREDENTIAL.match(text.strip())
    if match is None:
        raise S3Error(
            "AuthorizationHeaderMalformed",
            "the Credential is not ACCESS_KEY/yyyymmdd/region/s3/aws4_request",
        )
    access, date, region, service = match.groups()
    if service != "s3":
        raise S3Error("AuthorizationHeaderMalformed", f"service {service!r} is not s3")
    return Credential(access, date, region, service)


def _signed_headers(text: str) -> tuple[str, ...]:
    names = tuple(text.strip().split(";"))
    if not names or any(not n or n != n.lower() for n in names) or "host" not in names:
        raise S3Error(
            "AuthorizationHeaderMalformed", "SignedHeaders must be lower-case and include host"
        )
    return names


def parse_authorization(value: str, headers: Mapping[str, str]) -> SignedRequest:
    """The claims of an ``Authorization`` header (headers: lower-case names)."""
    if value.startswith("AWS "):
        raise S3Error(
            "InvalidRequest",
            "SigV2 signatures are not supported; sign with SigV4 (boto3: "
            "Config(signature_version='s3v4'))",
        )
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise S3Error("AuthorizationHeaderMalformed", f"unsupported algorithm {algorithm[:40]!r}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, item = part.strip().partition("=")
        if eq:
            fields[key] = item
    try:
        credential = _credential(fields["Credential"])
        names = _signed_headers(fields["SignedHeaders"])
        signature = fields["Signature"]
    except KeyError as exc:
        raise S3Error("AuthorizationHeaderMalformed", f"the header has no {exc.args[0]}") from None
    amz_date = headers.get("x-amz-date", "")
    if not amz_date:
        raise S3Error("AccessDenied", "SigV4 requests need an X-Amz-Date header", status=403)
    payload = headers.get("x-amz-content-sha256", "")
    if not payload:
        raise S3Error("InvalidRequest", "SigV4 requests need an x-amz-content-sha256 header")
    if payload not in (UNSIGNED, STREAMING, STREAMING_UNSIGNED_TRAILER) and not _HEX64.match(
        payload
    ):
        raise S3Error("InvalidArgument", f"x-amz-content-sha256 {payload[:70]!r} is not supported")
    return SignedRequest(credential, amz_date, names, signature, payload)


def parse_presigned(query: Sequence[tuple[str, str]]) -> SignedRequest:
    params = dict(query)
    if params.get("X-Amz-Algorithm") != ALGORITHM:
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Algorithm must be " + ALGORITHM)
    try:
        credential = _credential(params["X-Amz-Credential"])
        names = _signed_headers(params["X-Amz-SignedHeaders"])
        expires = int(params["X-Amz-Expires"])
        return SignedRequest(
            credential,
            params["X-Amz-Date"],
            names,
            params["X-Amz-Signature"],
            params.get("X-Amz-Content-Sha256", UNSIGNED),
            presigned=True,
            expires=expires,
        )
    except KeyError as exc:
        raise S3Error(
            "AuthorizationQueryParametersError", f"the presigned URL has no {exc.args[0]}"
        ) from None
    except ValueError:
        raise S3Error(
            "AuthorizationQueryParametersError", "X-Amz-Expires is not a number"
        ) from None


def verify(
    claim: SignedRequest,
    secret: str,
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    now: datetime,
) -> bytes:
    """Check the time window and the signature; returns the signing key (for chunks)."""
    when = parse_amz_date(claim.amz_date)
    if claim.amz_date[:8] != claim.credential.date:
        raise S3Error(
            "AuthorizationHeaderMalformed", "the credential's date is not the request's date"
        )
    if claim.presigned:
        if not 0 < claim.expires <= MAX_PRESIGN_EXPIRES:
            raise S3Error(
                "AuthorizationQueryParametersError",
                f"X-Amz-Expires must be between 1 and {MAX_PRESIGN_EXPIRES} seconds",
            )
        if now > when + timedelta(seconds=claim.expires):
            raise S3Error("AccessDenied", "the presigned URL has expired", status=403)
        if when - now > MAX_SKEW:
            raise S3Error("RequestTimeTooSkewed", "the presigned URL is dated in the future", 403)
    elif abs(now - when) > MAX_SKEW:
        raise S3Error(
            "RequestTimeTooSkewed",
            "the request time differs from the server's by more than 15 minutes",
            status=403,
        )
    canonical = canonical_request(
        method,
        raw_path,
        query,
        headers,
        claim.signed_headers,
        claim.payload_hash,
        skip_query="X-Amz-Signature" if claim.presigned else "",
    )
    key = signing_key(secret, claim.credential)
    expected = sign(key, string_to_sign(claim.amz_date, claim.credential.scope, canonical))
    if not hmac.compare_digest(expected, claim.signature.strip().lower()):
        raise S3Error(
            "SignatureDoesNotMatch",
            "the request signature does not match; check the secret key and the signing method",
            status=403,
        )
    return key


class ChunkSigner:
    """Verifies the signature of each chunk of a STREAMING-AWS4-HMAC-SHA256-PAYLOAD body."""

    def __init__(self, key: bytes, claim: SignedRequest) -> None:
        self._key = key
        self._head = f"AWS4-HMAC-SHA256-PAYLOAD\n{claim.amz_date}\n{claim.credential.scope}\n"
        self._previous = claim.signature.strip().lower()

    def check(self, signature: str, chunk_sha256: str) -> None:
        text = f"{self._head}{self._previous}\n{EMPTY_SHA256}\n{chunk_sha256}"
        expected = sign(self._key, text)
        if not hmac.compare_digest(expected, signature.strip().lower()):
            raise S3Error(
                "SignatureDoesNotMatch", "a chunk signature of the body does not match", status=403
            )
        self._previous = expected


def presign_url(
    *,
    method: str,
    host: str,
    path: str,
    access_key: str,
    secret: str,
    region: str,
    now: datetime,
    expires: int = 3600,
) -> str:
    """A presigned URL path+query for ``path`` (unencoded); for tests and the CLI."""
    credential = Credential(access_key, now.strftime("%Y%m%d"), region, "s3")
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    query = [
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{access_key}/{credential.scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    raw_path = uri_encode(path, keep_slash=True)
    canonical = canonical_request(method, raw_path, query, {"host": host}, ("host",), UNSIGNED)
    signature = sign(
        signing_key(secret, credential), string_to_sign(amz_date, credential.scope, canonical)
    )
    return f"{raw_path}?{canonical_query(query)}&X-Amz-Signature={signature}"
