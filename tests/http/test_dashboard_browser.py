"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium, against a local
domain of three supervised agents. What a person sees after an object is added (it appears,
placed, with its replicas), damaged (a byte flipped in a block file, found by ``cim-place scrub``:
the replica shows damaged, the object degraded) and repaired (placed again, the repair task in
its history). Screenshots go to the test's tmp dir, and to
``$CIM_PLACE_SCREENSHOTS`` when set (that is how ``docs/dashboard*.png`` were made)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cim_place.cluster.exchange.fetch import wait_for_holder
from cim_place.cluster.exchange.upload_client import upload
from cim_place.cluster.nats.connection import connected
from cim_place.local.credentials import ADMIN
from cim_place.local.domain import LocalDomain
from cim_place.objectstore.blockstore import block_name
from cim_place.objectstore.cid import to_str

pytestmark = [pytest.mark.browser, pytest.mark.nats, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# A name and metadata that would run script if the page ever put them in as HTML.
CLI = [sys.executable, "-m", "cim_place.cli"]
HOSTILE = "reports/<img src=x onerror=alert(1)>.txt"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    subprocess.run(["sh", str(ROOT / "scripts" / "install-test-deps.sh")], check=False)
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed and could not be "
            "(scripts/install-test-deps.sh needs root and apt-get)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"cim-place-chromium-{os.getpid()}"
    shutil.rmtree(profile, ignore_errors=True)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def local_domain(tmp_path: Path) -> AsyncIterator[LocalDomain]:
    domain = LocalDomain(tmp_path / "domain", leaves=3, zones=3, heartbeat=1.0)
    await domain.start()
    try:
        yield domain
    finally:
        await domain.stop()


async def until(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll what the page shows until ``check`` holds (the page refreshes itself every 2 s).
    The browser is asked from a thread: the domain's supervisor runs on this event loop."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard never showed {what}")
        await asyncio.sleep(0.5)


def text(driver: Any, css: str) -> str:
    """The text of every element matching ``css``, read in one script: the page redraws every
    2 s, so elements found first and read after may be gone (stale) by the time they are read.
    Table cells are separated by spaces, as a person reads them (innerText puts tabs)."""
    return str(
        driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(e => e.innerText.replace(/\\t/g, ' ')).join('\\n')",
            css,
        )
    )


def row_cids(driver: Any) -> list[str]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('#objects-body tr'))"
            ".map(r => r.getAttribute('data-cid'))"
        )
    )


def click(driver: Any, css: str) -> None:
    """Click the element ``css``, again if a redraw replaced it between finding and clicking."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError(f"{css} kept being redrawn before it could be clicked")


def replicas_pinned(driver: Any) -> int:
    return text(driver, "#replicas-body").count("pinned")


def shoot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    # The whole page: a window as tall as its content (plus what the window adds around it).
    driver.set_window_size(1440, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    frame = driver.execute_script("return window.outerHeight - window.innerHeight")
    driver.set_window_size(1440, max(900, int(height) + int(frame) + 8))
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("CIM_PLACE_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["CIM_PLACE_SCREENSHOTS"]) / name)


async def test_dashboard_shows_add_damage_and_repair(
    browser: Any, local_domain: LocalDomain, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    domain = local_domain
    first, last = domain.nodes[0], domain.nodes[-1]
    async with connected(domain.credentials.url(ADMIN, first.url)) as nc:
        assert await wait_for_holder(nc, first.node, timeout=20)
        for index in range(27):  # more than a page of 25
            body = f"object {index}\n".encode()
            await upload(nc, first.node, io.BytesIO(body), name=f"batch/{index:02}.txt")
        data = b"the dashboard's object\n" * 100
        result = await upload(
            nc, first.node, io.BytesIO(data), name=HOSTILE, metadata={"note": "<b>bold?</b>"}
        )
    cid = to_str(result.cid)

    # The middle node's dashboard: it keeps running while the other agents are paused below.
    # The domain has users: the page is the operator's, opened with its token (context.json's
    # dashboard URL), which the page trades for a cookie.
    dashboard = f"{domain.http_url(domain.nodes[1].node)}/ui/"
    browser.get(dashboard)
    await until("a refusal without the token", lambda: "operator" in browser.page_source)
    browser.get(domain.dashboard_url(domain.nodes[1].node))
    assert browser.current_url == dashboard  # the token left the address bar
    await until("three nodes up", lambda: text(browser, "#nodes-body").count(" up ") >= 3)
    await until("28 objects", lambda: "1-25 of 28" in text(browser, "#page-info"))
    await until("28 placed", lambda: text(browser, '[data-card="placed"] .value') == "28")
    shoot(browser, tmp_path, "dashboard.png")
    click(browser, "#next")
    await until("the second page", lambda: "26-28 of 28" in text(browser, "#page-info"))

    # Search by name glob: only the object, placed, its name shown as text.
    search = browser.find_element(By.ID, "q")
    search.send_keys("reports/*")
    await until(
        "the object alone, placed",
        lambda: (
            "placed" in text(browser, "#objects-body tr")
            and "1-1 of 1" in text(browser, "#page-info")
        ),
    )
    assert row_cids(browser) == [cid]
    assert HOSTILE in text(browser, "#objects-body tr")
    assert not browser.find_elements(By.CSS_SELECTOR, "#objects-body img, #object b")
    click(browser, f'#objects-body tr[data-cid="{cid}"]')
    await until("three pinned replicas", lambda: replicas_pinned(browser) == 3)
    await until("fetch tasks in the history", lambda: "fetch" in text(browser, "#history-body"))
    assert cid in text(browser, "#object-facts")
    assert "<b>bold?</b>" in text(browser, "#object-facts")

    # Damage: a byte flipped in the object's block on the middle node, found by `cim-place
    # scrub`. The other two holders' agents are paused first (SIGSTOP, so their supervisor does
    # not restart them): the repair has nobody to fetch from, and the damage stays on screen.
    middle = domain.nodes[1]
    (block,) = domain.volume_dir(middle.node).rglob(block_name(result.cid) + ".data")
    damaged = bytearray(block.read_bytes())
    damaged[10] ^= 0x01
    block.write_bytes(bytes(damaged))
    holders = [
        int(str(p["pid"]))
        for p in domain.processes()
        if p["role"] == "agent" and p["node"] in (first.node, last.node)
    ]
    for pid in holders:
        os.kill(pid, signal.SIGSTOP)
    try:
        scrub = await asyncio.to_thread(
            subprocess.run,
            [
                *CLI,
                "scrub",
                "--node",
                middle.node,
                "--server",
                domain.credentials.url(ADMIN, domain.hub_url),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert scrub.returncode == 0, scrub.stderr
        await until(
            f"the replica on {middle.node} damaged",
            lambda: any(
                state in text(browser, "#replicas-body") for state in ("damaged", "repairing")
            ),
        )
        await until("the object degraded", lambda: "degraded" in text(browser, "#object-facts"))
        await until("degraded in the list", lambda: "degraded" in text(browser, "#objects-body"))
        assert "1 damaged" in text(browser, "#object-facts")
        shoot(browser, tmp_path, "dashboard-object.png")
    finally:
        for pid in holders:
            os.kill(pid, signal.SIGCONT)

    # Repair: the agent is back, its copy counts again.
    await until("the object placed again", lambda: "placed" in text(browser, "#object-facts"))
    await until("three pinned replicas", lambda: replicas_pinned(browser) == 3)
    await until("every node up", lambda: "late" not in text(browser, "#nodes-body"))
    await until("the repair in the history", lambda: "repair" in text(browser, "#history-body"))
