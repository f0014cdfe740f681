"""An httpx transport with a connection pool per thread.

httpcore's pool looks at every pooled connection on each request and each
response close (idle and expiry checks, one ``poll`` per idle socket). With
a hundred flight threads sharing one pool of a hundred connections that scan
was a third of a worker's CPU in a bulk warm. Flights run one call at a time
per thread, so a small pool per thread serves them with no scan to speak of
and no lock shared across threads. The price: up to one kept-alive
connection per busy thread and provider host.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx

__all__ = ["ThreadLocalTransport"]


class ThreadLocalTransport(httpx.BaseTransport):
    """Delegates each request to the calling thread's own ``HTTPTransport``."""

    def __init__(self, make: Callable[[], httpx.BaseTransport] | None = None) -> None:
        self._make = make or (lambda: httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=30.0)))
        self._local = threading.local()
        self._all: list[httpx.BaseTransport] = []
        self._lock = threading.Lock()
        self._closed = False

    def _transport(self) -> httpx.BaseTransport:
        transport = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._make()
            with self._lock:
                if self._closed:
                    transport.close()
                    raise RuntimeError("transport is closed")
                self._all.append(transport)
            self._local.transport = transport
        return transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._transport().handle_request(request)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            transports, self._all = self._all, []
        for transport in transports:
            transport.close()
