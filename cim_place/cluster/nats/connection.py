"""Client connections to a cim-place domain.

This module owns how cim-place reaches NATS: which servers (argument, then ``CIM_PLACE_SERVER``,
then the local default), how hard to try (a CLI fails fast with an actionable error, a service
keeps reconnecting forever), and JetStream contexts bound to a domain (the hub's or a leaf's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from cim_place.cluster.nats import security
from cim_place.errors import TransportError

__all__ = [
    "DEFAULT_SERVER",
    "SERVER_ENV",
    "DomainJetStream",
    "connect",
    "connected",
    "flushed",
    "jetstream",
    "server_urls",
]

SERVER_ENV = "CIM_PLACE_SERVER"
DEFAULT_SERVER = "nats://127.0.0.1:4222"

_log = logging.getLogger(__name__)

# A CLI tries each server twice, 0.2 s apart, then gives up (nats-py otherwise retries forever).
_CLI_ATTEMPTS = 1
_CLI_RETRY_WAIT = 0.2


def server_urls(servers: str | list[str] | None = None) -> list[str]:
    """Resolve the servers to dial: the argument, else ``$CIM_PLACE_SERVER``, else the default.

    A string may hold several URLs separated by commas.
    """
    if servers is None:
        servers = os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    raw = servers.split(",") if isinstance(servers, str) else list(servers)
    urls = [u.strip() for u in raw if u.strip()]
    if not urls:
        raise TransportError(
            f"no NATS server given; pass --server nats://HOST:PORT or set {SERVER_ENV}"
        )
    return [u if "://" in u else f"nats://{u}" for u in urls]


async def connect(
    servers: str | list[str] | None = None,
    *,
    creds: str | None = None,
    name: str = "cim-place",
    connect_timeout: float = 2.0,
    for_service: bool = False,
) -> Client:
    """Connect to a cim-place domain and return the nats-py client.

    For CLI use (the default) an unreachable domain raises ``TransportError`` within a few
    seconds. With ``for_service=True`` (agents, controllers) the client waits for a server to
    appear and reconnects forever after a loss.
    """
    urls = server_urls(servers)
    shown = ", ".join(redacted(u) for u in urls)

    last_dial_error: list[Exception] = []

    async def quiet_error(error: Exception) -> None:
        # nats-py reports every failed dial; the caller gets one TransportError instead, naming
        # the last dial error (NoServersError alone hides the cause).
        last_dial_error[:] = [error]
        # A service's operator wants to see its link trouble; a CLI reports one error instead.
        _log.log(logging.WARNING if for_service else logging.DEBUG, "nats %s: %s", shown, error)

    nc = Client()
    options: dict[str, object] = {
        "servers": urls,
        "name": name,
        "connect_timeout": connect_timeout,
        "error_cb": quiet_error,
        # A secured domain's user may subscribe only under its own inbox prefix.
        **security.client_options(urls),
    }
    if creds is not None:
        options["user_credentials"] = creds
    if for_service:
        options.update(allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1.0)
        await nc.connect(**options)  # type: ignore[arg-type]
        return nc
    options.update(
        allow_reconnect=True,
        max_reconnect_attempts=_CLI_ATTEMPTS,
        reconnect_time_wait=_CLI_RETRY_WAIT,
    )
    # An overall bound in case a server accepts TCP but never completes the handshake.
    budget = (connect_timeout + _CLI_RETRY_WAIT) * (_CLI_ATTEMPTS + 1) * len(urls) + 1.0
    try:
        await asyncio.wait_for(nc.connect(**options), budget)  # type: ignore[arg-type]
    except (OSError, TimeoutError, nats.errors.Error) as error:
        with contextlib.suppress(Exception):
            await nc.close()
        reason = _describe(last_dial_error[0] if last_dial_error else error)
        raise TransportError(
            f"cannot reach a cim-place domain at {shown}: {reason}; start one with "
            f"`cim-place up`, or pass --server / set {SERVER_ENV}"
        ) from error
    return nc


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__


@contextlib.asynccontextmanager
async def connected(
    servers: str | list[str] | None = None,
    *,
    creds: str | None = None,
    name: str = "cim-place",
    connect_timeout: float = 2.0,
) -> AsyncIterator[Client]:
    """``async with connected(url) as nc``: a fail-fast client that is closed on exit."""
    nc = await connect(servers, creds=creds, name=name, connect_timeout=connect_timeout)
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


class DomainJetStream(JetStreamContext):
    """A JetStream context whose KV writes reach buckets in another server's domain.

    nats-py's ``nc.jetstream(domain=...)`` reroutes API calls only. Plain stream subjects cross a
    leaf link like any subject, but the servers keep KV subjects (``$KV.<bucket>.>``) inside
    their domain, so a KV put from the hub into a leaf's bucket finds no responder. The leaf
    accepts the same put behind its domain's API prefix (``$JS.<domain>.API.$KV...``), arriving
    from a server of another domain (measured with nats-server 2.15.1; on the leaf itself the
    prefixed subject goes nowhere). So ``$KV.`` publishes get that prefix, and only when the
    connected server belongs to another domain, as nats.go does for KV.
    """

    def __init__(self, nc: Client, domain: str | None, **options: Any) -> None:
        super().__init__(nc, domain=domain, **options)
        self.domain = domain
        local = (nc._server_info or {}).get("domain")
        remote = domain is not None and domain != local
        self._kv_prefix = f"$JS.{domain}.API." if remote else ""

    def _route(self, subject: str) -> str:
        return self._kv_prefix + subject if subject.startswith("$KV.") else subject

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> PubAck:
        return await super().publish(
            self._route(subject), payload, timeout, stream, headers, msg_ttl
        )

    async def publish_async(
        self,
        subject: str,
        payload: bytes = b"",
        wait_stall: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> asyncio.Future[PubAck]:
        return await super().publish_async(
            self._route(subject), payload, wait_stall, stream, headers, msg_ttl
        )


async def flushed(nc: Client, timeout: int = 10) -> None:
    """Return once the server has processed every command ``nc`` sent before the call.

    ``Client.flush`` alone does not promise that in nats-py 2.16: it writes its PING straight
    to the socket, ahead of commands still queued for the client's flusher task, so the PONG
    can come back before a SUB made just before has reached the server. Measured here: a
    report published by another connection right after ``subscribe`` and ``flush`` was missed
    12 times in 300. The flusher writes the queue during the first round trip; the second PING
    follows it on the socket, so its PONG means the server has the SUB (0 missed in 500).
    """
    await nc.flush(timeout)
    await nc.flush(timeout)


def jetstream(nc: Client, domain: str | None = None, *, timeout: float = 5.0) -> DomainJetStream:
    """A JetStream context for ``domain`` (``"hub"`` or a leaf's node id); None: the local one.

    KV writes through it reach the domain's buckets from any server (see ``DomainJetStream``);
    with nats-py's own ``nc.jetstream(domain=...)`` a KV put from another domain finds no bucket.
    """
    return DomainJetStream(nc, domain, timeout=timeout)
