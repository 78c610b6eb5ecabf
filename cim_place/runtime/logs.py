"""Logging of the long-running processes (agent, controller, ``up``), configured once per process.

One line per record: time (UTC, milliseconds), level, component, node and the message, e.g.::

    2026-12-05T14:50:01.123Z INFO agent leaf-1 cim_place.cluster.agent.service: attached to the hub

or, with ``--log-json`` (for log shippers), one JSON object per line with the keys ``time``,
``level``, ``component``, ``node``, ``logger``, ``message`` and, when there is one, ``exception``.

The level comes from ``--log-level``, else ``$CIM_PLACE_LOG``, else INFO. The node of a record is
the one bound with :func:`bound_node` where the task that logs was created, so several agents in
one process (``cim-place up``) each label their own lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TextIO

from cim_place.errors import CimPlaceError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV = "CIM_PLACE_LOG"

_node: ContextVar[str | None] = ContextVar("cim_place_node", default=None)
_HANDLER_NAME = "cim-place"


@contextlib.contextmanager
def bound_node(node: str) -> Iterator[None]:
    """Label the records of this context, and of every task created inside it, with ``node``."""
    token = _node.set(node)
    try:
        yield
    finally:
        _node.reset(token)


def parse_level(text: str | None) -> int:
    """The logging level named by ``text`` (any case), else ``$CIM_PLACE_LOG``, else INFO."""
    name = (text or os.environ.get(ENV) or "INFO").strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LEVELS:
        source = "--log-level" if text else f"${ENV}"
        raise CimPlaceError(
            f"{source} {name.lower()!r} is not a log level; use one of "
            f"{', '.join(level.lower() for level in LEVELS)}"
        )
    return int(logging.getLevelName(name))


class _Labels(logging.Filter):
    def __init__(self, component: str, node: str | None) -> None:
        super().__init__()
        self.component = component
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        record.node = _node.get() or self.node or "-"
        return True


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _labels_of(record: logging.LogRecord) -> tuple[str, str]:
    return str(getattr(record, "component", "-")), str(getattr(record, "node", "-"))


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        component, node = _labels_of(record)
        line = (
            f"{_timestamp(record)} {record.levelname} {component} {node} "
            f"{record.name}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        component, node = _labels_of(record)
        entry: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "component": component,
            "node": None if node == "-" else node,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(
    component: str,
    *,
    level: str | None = None,
    json_lines: bool = False,
    node: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send every record of this process to ``stream`` (stderr), one line each.

    Idempotent: a second call replaces the handler of the first, so tests and ``up`` (which
    runs agents and a controller in one process) never print a record twice.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.name == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.name = _HANDLER_NAME
    handler.addFilter(_Labels(component, node))
    handler.setFormatter(_JsonFormatter() if json_lines else _LineFormatter())
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    # nats-py logs every reconnect attempt at ERROR with a traceback; its own callbacks already
    # report what matters, so it speaks at WARNING and above only.
    logging.getLogger("nats").setLevel(max(logging.WARNING, root.level))
