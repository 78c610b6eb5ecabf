"""A TCP proxy in front of a hub's leafnode ports that cuts and restores a leaf's link.

This module owns ``LinkProxy``, the fault injector of tests and chaos runs: ``add_leaf(...,
via_proxy=True)`` (``topologies.py``) routes a leaf's link through one, and ``cut()``,
``restore()`` and ``delay`` then break, mend or slow that link. Nothing in a running domain
uses it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence

from cim_place.local.server_spec import LOCALHOST

__all__ = ["LinkProxy"]


class LinkProxy:
    """A TCP proxy on 127.0.0.1 in front of a hub's leafnode ports, to cut and restore a link.

    ``cut()`` closes every relayed connection and, until ``restore()``, closes new ones as soon as
    they are accepted, so the leaf sees its hub go away and keeps retrying.
    """

    def __init__(self, targets: Sequence[tuple[str, int]], *, port: int | None = None) -> None:
        if not targets:
            raise ValueError("LinkProxy needs at least one target (host, port)")
        self.targets = list(targets)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOCALHOST, port if port is not None else 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.delay = 0.0
        """Seconds added before each relayed chunk (a slow link); 0: none."""
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"link-proxy-{self.port}", daemon=True
        )
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"nats-leaf://{LOCALHOST}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def connection_count(self) -> int:
        """Number of relayed sockets (two per proxied connection) currently open."""
        with self._lock:
            return len(self._open)

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones until restore()."""
        with self._lock:
            self._cut = True
            sockets = list(self._open)
            self._open.clear()
        for sock in sockets:
            _close_socket(sock)

    def restore(self) -> None:
        """Relay new connections again (the leaf reconnects on its own schedule)."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and drop every connection."""
        with self._lock:
            self._closed = True
        self.cut()
        _close_socket(self._listener)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._cut or self._closed
            if refuse:
                _close_socket(client)
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = self._dial()
        if upstream is None:
            _close_socket(client)
            return
        with self._lock:
            if self._cut or self._closed:
                refuse = True
            else:
                refuse = False
                self._open.update((client, upstream))
        if refuse:
            _close_socket(client)
            _close_socket(upstream)
            return
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()

    def _dial(self) -> socket.socket | None:
        for host, port in self.targets:
            try:
                return socket.create_connection((host, port), timeout=2.0)
            except OSError:
                continue
        return None

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            source.settimeout(None)
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self.delay > 0:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _close_socket(source)
            _close_socket(sink)


def _close_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
