"""Which JetStream domain a CLI command talks to when the user did not say.

Domain-wide state (names, policies, nodes) lives in the hub's domain. A CLI may be pointed at a
hub server or at a leaf server; from either, ``$JS.hub.API`` reaches the hub when the topology has
one. A lone development server has no hub domain; there the server's own JetStream is the domain.
"""

from __future__ import annotations

from collections.abc import Callable

import nats.errors
from nats.aio.client import Client

from cim_place.errors import TransportError

__all__ = ["HUB_DOMAIN", "choose_domain"]

HUB_DOMAIN = "hub"
_PROBE_TIMEOUT = 2.0


async def choose_domain(
    nc: Client,
    requested: str | None = None,
    *,
    preferred: str = HUB_DOMAIN,
    on_fallback: Callable[[str], None] | None = None,
) -> str | None:
    """The JetStream domain to use: ``requested`` when given; else ``preferred`` when the
    connected server reaches a JetStream of that domain; else None (the server's own domain).

    A server with a domain of its own that cannot reach the hub is a leaf cut off from it: domain
    state must never be read from or written to a leaf's local JetStream by mistake, so that is
    an error naming the server, not a silent fallback. A lone server without a domain (a
    development server) is its own domain. ``on_fallback`` is kept for callers that want a note.
    """
    if requested:
        return requested
    info = nc._server_info or {}
    own = info.get("domain")
    if own == preferred:
        return preferred
    try:
        # The account info request is cheap, and only a server of that domain answers it.
        await nc.request(f"$JS.{preferred}.API.INFO", b"", timeout=_PROBE_TIMEOUT)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        if own:
            server = info.get("server_name") or "the server"
            raise TransportError(
                f"JetStream domain {preferred!r} is not reachable from {server} (domain {own!r}): "
                "its link to the hub may be down; connect to a hub server, or pass --domain"
            ) from None
        if on_fallback is not None:
            on_fallback(f"note: no {preferred!r} domain; using the server's own JetStream")
        return None
    return preferred
