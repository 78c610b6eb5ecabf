"""Prometheus metrics of every long-running process: declaring them, and serving them over HTTP.

A process's metrics are a :class:`Metrics` subclass whose class body declares each metric once,
``blocks_stored = counter("cim_place_blocks_stored", "Blocks written here.")``; every instance
gets its own :class:`CollectorRegistry` holding its own copy of each declared metric (so several
agents in one process, as in tests, never collide) and reads them as typed attributes
(``metrics.blocks_stored.inc()``). :func:`serve_metrics` exposes a registry at ``/metrics``.

Metric names are a contract (deploy/prometheus/alerts.yaml, the Grafana dashboard,
tests/local/test_alerts.py): a declaration states the name exactly as exported, less the
``_total`` suffix prometheus_client adds to counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Declared", "Metrics", "counter", "gauge", "histogram", "serve_metrics"]

M = TypeVar("M", Counter, Gauge, Histogram)


class Declared(Generic[M]):
    """A metric declared in a :class:`Metrics` class body; each instance creates its own."""

    def __init__(
        self, kind: type[M], name: str, documentation: str, labels: Sequence[str], **extra: Any
    ) -> None:
        self.kind: type[M] = kind
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.extra = extra

    def create(self, registry: CollectorRegistry) -> M:
        return self.kind(
            self.name, self.documentation, self.labels, registry=registry, **self.extra
        )

    def __get__(self, instance: Metrics, owner: type[Metrics] | None = None) -> M:
        # Only reached before Metrics.__init__ has shadowed the declaration on the instance.
        raise AttributeError(f"{self.name} is created by {type(instance).__name__}.__init__")


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Declared[Counter]:
    return Declared(Counter, name, documentation, labels)


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Declared[Gauge]:
    return Declared(Gauge, name, documentation, labels)


def histogram(
    name: str, documentation: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
) -> Declared[Histogram]:
    return Declared(Histogram, name, documentation, labels, buckets=tuple(buckets))


class Metrics:
    """A registry of one's own, holding one copy of every metric declared on the class."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for klass in reversed(type(self).__mro__):
            for attribute, value in vars(klass).items():
                if isinstance(value, Declared):
                    # An instance attribute shadows the (non-data) descriptor from now on.
                    setattr(self, attribute, value.create(self.registry))

    def serve(self, address: str) -> None:
        serve_metrics(self.registry, address)


def serve_metrics(registry: CollectorRegistry, address: str) -> None:
    """Expose ``registry`` at ``/metrics`` on ``host:port`` (a thread of prometheus_client)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
