"""A node's HTTP settings and listen addresses, without the HTTP stack (the CLI and the agent
configuration read them; importing aiohttp is left to the processes that serve)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cim_place.errors import CimPlaceError

OFF = "off"
DEFAULT_LISTEN = "127.0.0.1:0"
"""The gateway's default: loopback only, a free port."""


class HttpConfigError(CimPlaceError):
    """An HTTP listen address or TLS setting is invalid; nothing was started."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of a TLS listener; ``client_ca`` asks clients for a certificate (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """A node's HTTP settings (``http:`` of the agent configuration)."""

    listen: str = DEFAULT_LISTEN
    """host:port of the gateway's listener (port 0: a free one)."""
    tls: TlsFiles | None = None
    tokens: Mapping[str, str] = field(default_factory=dict)
    """Bearer tokens: the SHA-256 (hex) of each token -> the user it stands for."""
    dashboard_server: str | None = None
    """NATS URL (with the read-only operator's credentials) the dashboard reads the domain
    through; None: the agent's own connection (enough in an open domain)."""


def parse_listen(text: str, *, what: str = "http.listen") -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``[v6]:port``; HttpConfigError naming ``what``."""
    hint = f"{what} must be host:port (e.g. 127.0.0.1:8080, [::1]:8080, 0.0.0.0:0) or {OFF!r}"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise HttpConfigError(f"{what} {text!r} has no port; {hint}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise HttpConfigError(f"{what} {text!r}: unclosed '[' around an IPv6 address; {hint}")
        host = host[1:-1]
    elif ":" in host:
        raise HttpConfigError(f"{what} {text!r}: write an IPv6 address in brackets; {hint}")
    try:
        port = int(port_text)
    except ValueError:
        raise HttpConfigError(
            f"{what} {text!r}: port {port_text!r} is not a number; {hint}"
        ) from None
    if not 0 <= port <= 65535:
        raise HttpConfigError(f"{what} {text!r}: port {port} is outside 0-65535; {hint}")
    return host, port
