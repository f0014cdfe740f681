"""An httpx transport with a connection pool per thread.

httpcore's pool looks at every pooled connection on each request and each
response close (idle and expiry checks, one ``poll`` per idle socket). With
a hundred flight threads sharing one pool of a hundred connections that scan
was a third of a worker's CPU in a bulk warm. Flights run one call at a time
per thread, so a small pool per thread serves them with no scan to speak of
and no lock shared across threads. The price: up to one kept-alive
connection per busy thread and provider host. A thread that ends takes its
pool with it (closed when the thread's local state is freed), so threads that
come and go (an API's worker threads) leave no connections behind.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import httpx

__all__ = ["ThreadLocalTransport"]


class _Held:
    """One thread's transport; closing it is tied to this holder's life."""

    __slots__ = ("transport", "__weakref__")

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport


class ThreadLocalTransport(httpx.BaseTransport):
    """Delegates each request to the calling thread's own ``HTTPTransport``."""

    def __init__(self, make: Callable[[], httpx.BaseTransport] | None = None) -> None:
        self._make = make or (lambda: httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=30.0)))
        self._local = threading.local()
        self._all: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def _transport(self) -> httpx.BaseTransport:
        held = getattr(self._local, "held", None)
        if held is None:
            transport = self._make()
            with self._lock:
                if self._closed:
                    transport.close()
                    raise RuntimeError("transport is closed")
                held = _Held(transport)
                # The thread's end frees its local state, and with it the holder.
                weakref.finalize(held, transport.close)
                self._all.add(held)
            self._local.held = held
        return held.transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._transport().handle_request(request)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            held, self._all = list(self._all), weakref.WeakSet()
        for one in held:
            one.transport.close()
