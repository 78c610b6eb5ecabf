"""S3 access keys, kept in the domain's KV bucket ``cim-place-s3-keys``.

SigV4 signatures are HMACs keyed by (a key derived from) the secret, so the server must know the
secret itself: a hash of it, as for passwords, cannot verify anything. The secret is therefore
stored in the bucket as it is; whoever can read that bucket (the hub's JetStream, the operator
and agent users) can sign as any key. ``docs/S3.md`` says so; the CLI shows a secret once, at
creation, and never lists it.

One key per access key id; the value is JSON ``{"secret", "created_at", "created_by", "note",
"region", "operator"}``. The operator key of a local domain (``cim-place up``) has
``operator: true`` and is found again by :func:`ensure_operator_key`.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from dataclasses import asdict, dataclass

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cim_place.cluster.nats.kv import ensure_bucket
from cim_place.errors import CimPlaceError, TransportError

KEYS_BUCKET = "cim-place-s3-keys"
DEFAULT_REGION = "us-east-1"
_ALPHABET = string.ascii_uppercase + string.digits


class UnknownKeyError(CimPlaceError):
    """No such access key."""


@dataclass(frozen=True, slots=True)
class S3Key:
    access_key: str
    secret_key: str
    created_at: float = 0.0
    created_by: str = ""
    note: str = ""
    region: str = DEFAULT_REGION
    operator: bool = False

    def to_context(self) -> dict[str, str]:
        """What ``context.json`` holds under ``s3``."""
        return {
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
        }


def new_key(*, note: str = "", created_by: str = "", operator: bool = False) -> S3Key:
    access = "CP" + "".join(secrets.choice(_ALPHABET) for _ in range(18))
    secret = secrets.token_urlsafe(30)[:40]
    return S3Key(access, secret, time.time(), created_by, note, DEFAULT_REGION, operator)


def _encode(key: S3Key) -> bytes:
    doc = asdict(key)
    del doc["access_key"]
    return json.dumps(doc, sort_keys=True).encode()


def _decode(access: str, value: bytes | None) -> S3Key | None:
    try:
        doc = json.loads(value or b"")
        return S3Key(
            access,
            str(doc["secret_key"]),
            float(doc.get("created_at", 0)),
            str(doc.get("created_by", "")),
            str(doc.get("note", "")),
            str(doc.get("region", DEFAULT_REGION)),
            bool(doc.get("operator", False)),
        )
    except (ValueError, KeyError, TypeError):
        return None


class KeyStore:
    """Read and write access keys (``js``: JetStream of the hub's domain)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await ensure_bucket(self._js, KEYS_BUCKET)
        return self._kv

    async def create(
        self, *, note: str = "", created_by: str = "", operator: bool = False
    ) -> S3Key:
        key = new_key(note=note, created_by=created_by, operator=operator)
        kv = await self._bucket()
        try:
            await kv.create(key.access_key, _encode(key))
        except nats.errors.Error as exc:
            raise TransportError(f"cannot store the access key in {KEYS_BUCKET}: {exc}") from exc
        return key

    async def get(self, access_key: str) -> S3Key | None:
        if not access_key or not all(c.isalnum() for c in access_key) or len(access_key) > 128:
            return None
        kv = await self._bucket()
        try:
            entry = await kv.get(access_key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise TransportError(f"cannot read {KEYS_BUCKET}/{access_key}: {exc}") from exc
        return _decode(access_key, entry.value)

    async def ls(self) -> list[S3Key]:
        from cim_place.http.s3.index import kv_entries

        await self._bucket()
        found: list[S3Key] = []
        for access, value in await kv_entries(self._js, KEYS_BUCKET, ">"):
            key = _decode(access, value)
            if key is not None:
                found.append(key)
        return sorted(found, key=lambda k: k.access_key)

    async def rm(self, access_key: str) -> None:
        if await self.get(access_key) is None:
            raise UnknownKeyError(
                f"no S3 access key {access_key!r}; list them with `cim-place s3 key ls`"
            )
        kv = await self._bucket()
        try:
            await kv.delete(access_key)
        except nats.errors.Error as exc:
            raise TransportError(f"cannot remove {KEYS_BUCKET}/{access_key}: {exc}") from exc


async def ensure_operator_key(js: JetStreamContext) -> S3Key:
    """The domain's operator key, created on first use (``cim-place up`` writes it to
    ``context.json``). Idempotent."""
    store = KeyStore(js)
    for key in await store.ls():
        if key.operator:
            return key
    return await store.create(note="operator key of the local domain", operator=True)
