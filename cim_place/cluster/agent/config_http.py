"""The ``http`` section of the agent configuration: the node's gateway listener.

    http:
      listen: 127.0.0.1:8080        # or off (the default): no HTTP listener
      tls: {cert: /etc/cim-place/tls/http.pem, key: /etc/cim-place/tls/http-key.pem,
            client_ca: /etc/cim-place/tls/clients-ca.pem}   # client_ca: optional, mTLS
      tokens: {<sha256 hex of a token>: alice}              # bearer tokens, stored hashed
      dashboard_server: nats://operator:PW@hub:4222         # the dashboard reads as this user

Checked like the rest of the file: every problem is reported with its position.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from cim_place.errors import CimPlaceError
from cim_place.http.settings import OFF, HttpSettings, TlsFiles, parse_listen

if TYPE_CHECKING:
    from cim_place.policies.loader import Path as YamlPath
    from cim_place.runtime.config import ConfigChecker

_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_s3(value: object, checker: ConfigChecker, root: YamlPath) -> tuple[str, str] | None:
    """``(listen, region)`` of the node's S3 listener; None for ``off`` or an absent section."""
    at: YamlPath = (*root, "s3")
    if value is None or value is False or value == OFF:
        return None
    section = checker.section(value, at, {"listen", "region"})
    raw = section.get("listen", OFF)
    if raw is False or raw is None or raw == OFF:
        return None
    listen = checker.text(raw, (*at, "listen"), f"listen (host:port or {OFF})")
    if listen is not None:
        try:
            parse_listen(listen, what="s3.listen")
        except CimPlaceError as exc:
            checker.problem((*at, "listen"), str(exc))
            listen = None
    region = "us-east-1"
    if "region" in section:
        region = checker.text(section["region"], (*at, "region"), "region") or region
    return None if listen is None else (listen, region)


def check_http(value: object, checker: ConfigChecker, root: YamlPath) -> HttpSettings | None:
    """The node's HTTP settings; None for ``off`` or an absent section (problems are noted)."""
    at: YamlPath = (*root, "http")
    if value is None or value is False or value == OFF:
        return None
    section = checker.section(value, at, {"listen", "tls", "tokens", "dashboard_server"})
    raw = section.get("listen", OFF)
    # YAML 1.1 reads a bare `off` as false.
    if raw is False or raw is None or raw == OFF:
        return None
    listen = checker.text(raw, (*at, "listen"), f"listen (host:port or {OFF})")
    if listen is not None:
        try:
            parse_listen(listen, what="listen")
        except CimPlaceError as exc:
            checker.problem((*at, "listen"), str(exc))
            listen = None
    tls = _check_tls(section.get("tls"), checker, at) if "tls" in section else None
    tokens: dict[str, str] = {}
    if "tokens" in section:
        raw_tokens = section["tokens"]
        if not isinstance(raw_tokens, dict):
            checker.problem(
                (*at, "tokens"), "tokens must map a token's SHA-256 (hex) to a user name"
            )
        else:
            for digest, user in raw_tokens.items():
                if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                    checker.problem(
                        (*at, "tokens", digest),
                        "a token key must be the SHA-256 of the token, 64 lower-case hex digits",
                        'e.g. printf %s "$TOKEN" | sha256sum',
                        key=True,
                    )
                elif name := checker.text(user, (*at, "tokens", digest), "a token's user"):
                    tokens[digest] = name
    dashboard_server = None
    if "dashboard_server" in section:
        dashboard_server = checker.text(
            section["dashboard_server"], (*at, "dashboard_server"), "a NATS URL"
        )
    if listen is None:
        return None
    return HttpSettings(listen=listen, tls=tls, tokens=tokens, dashboard_server=dashboard_server)


def _check_tls(value: object, checker: ConfigChecker, at: YamlPath) -> TlsFiles | None:
    raw = checker.section(value, (*at, "tls"), {"cert", "key", "client_ca"})
    files: dict[str, str] = {}
    for key, what in (("cert", "certificate"), ("key", "key"), ("client_ca", "client CA")):
        if key in raw:
            text = checker.text(raw[key], (*at, "tls", key), f"tls {what} file")
            if text:
                files[key] = text
    if "cert" not in files or "key" not in files:
        checker.problem(
            (*at, "tls"),
            "tls needs both `cert` and `key` to serve HTTPS",
            "e.g. tls: {cert: /etc/cim-place/tls/http.pem, key: /etc/cim-place/tls/http-key.pem}",
        )
        return None
    client_ca = Path(files["client_ca"]) if "client_ca" in files else None
    return TlsFiles(Path(files["cert"]), Path(files["key"]), client_ca)
