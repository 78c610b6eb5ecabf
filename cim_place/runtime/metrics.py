"""Serving a Prometheus registry over HTTP: every long-running process's metrics endpoint."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(registry: CollectorRegistry, address: str) -> None:
    """Expose ``registry`` at ``/metrics`` on ``host:port`` (a thread of prometheus_client)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
