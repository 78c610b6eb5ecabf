"""Logging of long-running processes: one line per record naming component and node, JSON lines
on request, the level from the flag or the environment, and a clear error for a bad level."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from cim_place.errors import CimPlaceError
from cim_place.runtime.logs import bound_node, configure_logging, parse_level


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_line_names_time_level_component_node_and_logger() -> None:
    out = io.StringIO()
    configure_logging("agent", level="info", node="leaf-1", stream=out)
    logging.getLogger("cim_place.test").info("attached to %s", "the hub")
    logging.getLogger("cim_place.test").debug("not shown at info")
    (line,) = out.getvalue().splitlines()
    stamp, level, component, node, rest = line.split(" ", 4)
    assert stamp.endswith("Z") and "T" in stamp
    assert (level, component, node) == ("INFO", "agent", "leaf-1")
    assert rest == "cim_place.test: attached to the hub"


def test_json_lines_for_log_shippers() -> None:
    out = io.StringIO()
    configure_logging("controller", level="debug", json_lines=True, stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("cim_place.x").exception("failed")
    entry = json.loads(out.getvalue().splitlines()[0])
    assert entry["level"] == "ERROR" and entry["component"] == "controller"
    assert entry["node"] is None and entry["message"] == "failed"
    assert "RuntimeError: boom" in entry["exception"]


def test_tasks_created_in_a_bound_context_carry_their_node() -> None:
    out = io.StringIO()
    configure_logging("up", level="info", stream=out)
    log = logging.getLogger("cim_place.test")

    async def agent(node: str) -> None:
        with bound_node(node):
            task = asyncio.create_task(asyncio.sleep(0, result=None))
            await task
            await asyncio.create_task(_say(log, f"hello from {node}"))

    async def main() -> None:
        await asyncio.gather(agent("leaf-1"), agent("leaf-2"))
        log.info("the domain")

    asyncio.run(main())
    lines = sorted(out.getvalue().splitlines(), key=lambda s: s.split(" ", 1)[1])
    nodes = {line.split(" ")[3]: line.rsplit(": ", 1)[1] for line in lines}
    assert nodes == {
        "leaf-1": "hello from leaf-1",
        "leaf-2": "hello from leaf-2",
        "-": "the domain",
    }


async def _say(log: logging.Logger, message: str) -> None:
    log.info(message)


def test_configuring_twice_prints_each_record_once() -> None:
    out = io.StringIO()
    configure_logging("agent", stream=out)
    configure_logging("agent", stream=out)
    logging.getLogger("cim_place.test").warning("once")
    assert out.getvalue().count("once") == 1


def test_level_from_the_environment_and_a_bad_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIM_PLACE_LOG", "warn")
    assert parse_level(None) == logging.WARNING
    assert parse_level("debug") == logging.DEBUG
    with pytest.raises(CimPlaceError, match="--log-level 'loud' is not a log level"):
        parse_level("loud")
    monkeypatch.setenv("CIM_PLACE_LOG", "nope")
    with pytest.raises(CimPlaceError, match=r"\$CIM_PLACE_LOG 'nope'"):
        parse_level(None)
