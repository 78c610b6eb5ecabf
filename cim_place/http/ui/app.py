"""Mounts the dashboard on a node's HTTP application: the page and its files under ``/ui/``,
the JSON API under ``/ui/api/``, and the access rule of ``docs/SECURITY.md``.

In a domain that authenticates its users the dashboard shows the whole domain, so it answers
only the operator (user ``operator``: a bearer token of ``http.tokens`` or a client certificate
whose common name is ``operator``): 401 for an anonymous client or an unknown token, 403 for
anyone else. In an open domain it answers everyone, as the gateway does. A browser cannot send a
bearer header from its address bar, so ``/ui/?token=T`` trades a valid token for an HttpOnly,
SameSite=Strict cookie (path ``/ui/``) and redirects to ``/ui/``, off the address bar.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from cim_place.cluster.nats.security import OPERATOR
from cim_place.http.sources import Identify, UnknownTokenError, token_digest
from cim_place.http.ui.api import DashboardApi, JetStreamOf, error

PREFIX = "/ui"
COOKIE = "cim_place_ui"
_FILES = {
    "index.html": "text/html",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}
_HEADERS = {
    # Everything the page needs comes from this origin; no inline script, no framing.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _static(name: str) -> bytes:
    return (resources.files("cim_place.http.ui") / "static" / name).read_bytes()


def _token_user(identify: Identify, token: str) -> str | None:
    digest = token_digest(token)
    for known, user in identify.tokens.items():
        if hmac.compare_digest(known, digest):
            return user
    raise UnknownTokenError("the dashboard token is not known to this node")


def _guarded(handler: Handler, identify: Identify, secured: bool) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if secured:
            offered = request.query.get("token", "")
            try:
                if offered and request.path == f"{PREFIX}/":
                    if _token_user(identify, offered) != OPERATOR:
                        return error(403, "that token is not the operator's")
                    found = web.HTTPFound(f"{PREFIX}/")
                    found.set_cookie(
                        COOKIE, offered, path=f"{PREFIX}/", httponly=True, samesite="Strict"
                    )
                    return found
                cookie = request.cookies.get(COOKIE, "")
                if cookie and "Authorization" not in request.headers:
                    user = _token_user(identify, cookie)
                else:
                    user = identify(request)
            except UnknownTokenError as exc:
                return _unauthorized(str(exc))
            if user is None:
                return _unauthorized("the dashboard needs the operator's token or certificate")
            if user != OPERATOR:
                return error(403, f"user {user!r} may not read the dashboard; it is the operator's")
        response = await handler(request)
        response.headers.update(_HEADERS)
        return response

    return guarded


def _unauthorized(reason: str) -> web.Response:
    response = error(401, reason)
    response.headers["WWW-Authenticate"] = 'Bearer realm="cim-place"'
    return response


async def _page(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("file") or "index.html"
    kind = _FILES.get(name)
    if kind is None:
        return error(404, f"no file {name[:60]!r} in the dashboard")
    return web.Response(
        body=_static(name),
        content_type=kind,
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


async def _to_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")


async def _unknown_api(request: web.Request) -> web.StreamResponse:
    return error(
        404, "unknown dashboard API; see /ui/api/summary, nodes, objects, object/CID, tasks"
    )


def add_dashboard(
    app: web.Application, js: JetStreamOf, *, identify: Identify, secured: bool
) -> DashboardApi:
    """Add the dashboard's routes to ``app`` (the gateway's application)."""
    api = DashboardApi(js)
    routes: list[tuple[str, Handler]] = [
        (PREFIX, _to_slash),
        (f"{PREFIX}/", _page),
        (f"{PREFIX}/static/{{file}}", _page),
        (f"{PREFIX}/api/summary", api.summary),
        (f"{PREFIX}/api/nodes", api.nodes),
        (f"{PREFIX}/api/objects", api.objects),
        (f"{PREFIX}/api/object/{{ref:.+}}", api.object),
        (f"{PREFIX}/api/tasks", api.tasks),
        (f"{PREFIX}/api/{{rest:.*}}", _unknown_api),
    ]
    for path, handler in routes:
        app.router.add_route("GET", path, _guarded(handler, identify, secured))
    return api
