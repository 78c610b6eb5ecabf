"""The HTTP listeners of a node: which aiohttp applications listen where, and their lifetime.

A node may run several listeners, each one aiohttp ``Application`` on its own address: the
gateway (and later the dashboard) on ``http.listen``, the S3 API on its own. This module only
binds and unbinds them; it knows nothing of what the applications serve. The hook for another
application is :class:`Listener`: build the app, pass ``Listener(name, app, listen, tls)`` to
:func:`start_listeners` (or :class:`HttpServers`) beside the gateway's.

Listen addresses are ``host:port`` (``[v6]:port`` for IPv6); port 0 takes a free port, and the
bound address is reported back (``HttpServers.urls``), which is how ``cim-place up`` learns the
base URL it writes to ``context.json``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from cim_place.http.settings import (
    DEFAULT_LISTEN,
    OFF,
    HttpConfigError,
    HttpSettings,
    TlsFiles,
    parse_listen,
)

__all__ = [
    "DEFAULT_LISTEN",
    "OFF",
    "HttpConfigError",
    "HttpServers",
    "HttpSettings",
    "Listener",
    "TlsFiles",
    "parse_listen",
    "server_context",
    "start_listeners",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Listener:
    """One application on one address (``name`` appears in logs and errors)."""

    name: str
    app: web.Application
    listen: str
    tls: TlsFiles | None = None


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """A server-side TLS context from PEM files; HttpConfigError when they cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.client_ca is not None:
            context.load_verify_locations(str(tls.client_ca))
            # Optional, not required: a client without a certificate is anonymous, and the
            # access rules decide what an anonymous client may read.
            context.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise HttpConfigError(
            f"cannot load the HTTP TLS certificate {tls.cert} / key {tls.key}"
            f"{f' / client CA {tls.client_ca}' if tls.client_ca else ''}: {exc}; "
            "check http.tls in the agent configuration (PEM files readable by the agent)"
        ) from None
    return context


def _url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


class HttpServers:
    """Runs a set of listeners: ``await start()`` binds them all (or none), ``await stop()``."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        names = [listener.name for listener in listeners]
        if len(set(names)) != len(names):
            raise HttpConfigError(f"HTTP listener names must be unique, got {names}")
        self.listeners = list(listeners)
        self.urls: dict[str, str] = {}
        """Base URL of each running listener by name (the bound port, not 0)."""
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        try:
            for listener in self.listeners:
                await self._start_one(listener)
        except BaseException:
            await self.stop()
            raise

    async def _start_one(self, listener: Listener) -> None:
        host, port = parse_listen(listener.listen, what=f"the {listener.name} listen address")
        context = server_context(listener.tls) if listener.tls is not None else None
        # A short shutdown timeout: a client that keeps a download open must not hold up the
        # agent's stop by aiohttp's default minute.
        runner = web.AppRunner(listener.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        self._runners.append(runner)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise HttpConfigError(
                f"cannot listen for {listener.name} on {listener.listen}: {exc.strerror or exc}; "
                "choose another address or port (port 0 takes a free one)"
            ) from None
        # Binding the socket ourselves gives the bound port at once (port 0 included).
        bound_port = sock.getsockname()[1]
        site = web.SockSite(runner, sock, ssl_context=context)
        await site.start()
        self.urls[listener.name] = _url(host, bound_port, context is not None)
        _log.info("%s listening on %s", listener.name, self.urls[listener.name])

    async def stop(self) -> None:
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            try:
                await runner.cleanup()
            except Exception as exc:  # a stop must reach every runner
                _log.warning("stopping an HTTP listener: %s", exc)
        self.urls = {}

    async def __aenter__(self) -> HttpServers:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_listeners(listeners: Sequence[Listener]) -> HttpServers:
    """Bind every listener (all or none) and return the running set; stop it with ``stop()``."""
    servers = HttpServers(listeners)
    await servers.start()
    return servers
