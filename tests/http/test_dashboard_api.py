"""The dashboard's page and JSON API over real HTTP: files, headers, 400s with one-line reasons,
and the operator-only rule of a secured domain."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from http_domain import Domain

from cim_place.http.server import HttpServers, Listener
from cim_place.http.sources import Identify, token_digest
from cim_place.http.ui import add_dashboard


async def get(url: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        body: Any = await response.read()
        if response.content_type == "application/json":
            body = await response.json()
        return response.status, dict(response.headers), body


async def test_page_files_and_headers(domain: Domain) -> None:
    base = domain.url(domain.a)
    status, headers, body = await get(f"{base}/ui/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"static/dashboard.js" in body and b"<script>" not in body  # no inline script
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, headers, _ = await get(f"{base}/ui/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind)
    status, _, body = await get(f"{base}/ui/static/..%2Fapi.py")
    assert status == 404 and "no file" in body["error"]
    status, _, body = await get(f"{base}/ui/api/nothing")
    assert status == 404 and "\n" not in body["error"]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("state=bogus", "state 'bogus' is not one of placed"),
        ("limit=0", "limit must be between 1 and 500"),
        ("limit=many", "limit must be a whole number"),
        ("limit=501", "limit must be between 1 and 500"),
        ("q=%01x", "q holds control characters"),
        ("q=" + "x" * 300, "q is longer than 256"),
        ("after=%0a", "after holds control characters"),
    ],
)
async def test_bad_parameters_answer_400(domain: Domain, query: str, reason: str) -> None:
    status, _, body = await get(f"{domain.url(domain.a)}/ui/api/objects?{query}")
    assert status == 400
    assert body["error"].startswith(reason) and "\n" not in body["error"]


async def test_nodes_summary_and_unknown_object(domain: Domain) -> None:
    base = domain.url(domain.b)
    # Each agent's first heartbeat reaches the hub's KV through its leaf: wait for both.
    for _ in range(600):
        status, _, nodes = await get(f"{base}/ui/api/nodes")
        assert status == 200
        if len(nodes) == 2 and all(n["state"] == "up" for n in nodes):
            break
        await asyncio.sleep(0.1)
    assert sorted(n["node"] for n in nodes) == ["node-a", "node-b"]
    assert {n["labels"]["zone"] for n in nodes} == {"z1", "z2"}
    assert all(n["state"] == "up" and n["free"] > 0 for n in nodes)
    status, _, summary = await get(f"{base}/ui/api/summary")
    assert status == 200 and summary["nodes"]["up"] == 2
    # No controller runs here: the locations may not exist yet, said in one line.
    status, _, body = await get(f"{base}/ui/api/objects")
    assert (status, body.get("objects")) == (200, []) or (
        status == 502 and "\n" not in body["error"]
    )
    status, _, body = await get(f"{base}/ui/api/object/no-such-name")
    assert status in (404, 502) and "\n" not in body["error"]
    status, _, tasks = await get(f"{base}/ui/api/tasks")
    assert status == 200 and tasks["in_flight"] == [] and tasks["queued"] == 0


async def test_secured_domain_answers_only_the_operator() -> None:
    async def no_domain() -> Any:
        raise AssertionError("the access rule answers before the domain is read")

    app = web.Application()
    identify = Identify({token_digest("op-token"): "operator", token_digest("al-token"): "alice"})
    add_dashboard(app, no_domain, identify=identify, secured=True)
    async with HttpServers([Listener("gateway", app, "127.0.0.1:0")]) as servers:
        base = servers.urls["gateway"]
        for path in ("/ui/", "/ui/api/nodes", "/ui/static/dashboard.js"):
            status, headers, body = await get(base + path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
            assert "operator" in body["error"]
            status, _, body = await get(base + path, Authorization="Bearer wrong")
            assert status == 401 and "not known" in body["error"]
            status, _, body = await get(base + path, Authorization="Bearer al-token")
            assert status == 403 and "alice" in body["error"]
        status, _, body = await get(base + "/ui/", Authorization="Bearer op-token")
        assert status == 200 and b"cim-place" in body
