"""Serving the sandbox over real HTTP on loopback, in a thread or a process.

The socket is bound before uvicorn starts, so port 0 yields a free port
that is known at once and cannot be taken by anyone else in between.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from .app import create_app
from .state import SandboxProvider

__all__ = ["SandboxHandle", "run_sandbox", "serve_forever", "bind_socket", "url_for"]

# Lets a stop finish quickly even if a request is still being served.
_GRACEFUL_SHUTDOWN_SECONDS = 1


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when
    # the proto says TCP, and without it Nagle + delayed ACK add ~40 ms per response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(app: Starlette, log_level: str) -> uvicorn.Config:
    # log_config=None: never reconfigure the host process's logging (pytest's capture included).
    return uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
    )


def _answers(sock: socket.socket, timeout: float) -> bool:
    host, port = sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/_admin/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class SandboxHandle:
    """A running sandbox: its ``url``, its ``provider``, and ``stop()``."""

    def __init__(self, url: str, provider: SandboxProvider, app: Starlette, server: uvicorn.Server,
                 thread: threading.Thread, sock: socket.socket) -> None:
        self.url = url
        self.provider = provider
        self._app = app
        self._server = server
        self._thread = thread
        self._sock = sock

    def __repr__(self) -> str:
        return f"SandboxHandle(url={self.url!r})"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the server thread; idempotent."""
        loop = getattr(self._app.state, "loop", None)
        stopping = getattr(self._app.state, "stopping", None)
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop closed in between
                pass
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> SandboxHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def run_sandbox(
    provider: SandboxProvider | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    startup_timeout: float = 10.0,
    log_level: str = "warning",
) -> SandboxHandle:
    """Serve ``provider`` (a fresh one by default) from a background thread; return once it answers."""
    provider = provider if provider is not None else SandboxProvider()
    sock = bind_socket(host, port)
    url = url_for(sock)
    provider.issuer = url
    app = create_app(provider)
    server = uvicorn.Server(_config(app, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"sandbox {url}", daemon=True)
    thread.start()
    handle = SandboxHandle(url, provider, app, server, thread, sock)
    deadline = time.monotonic() + startup_timeout
    while not (server.started and _answers(sock, timeout=max(0.1, deadline - time.monotonic()))):
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"sandbox provider did not start on {url}")
        time.sleep(0.01)
    return handle


def serve_forever(
    provider: SandboxProvider,
    host: str,
    port: int,
    *,
    announce: Callable[[str], None] = print,
    log_level: str = "warning",
) -> None:
    """Serve in this process's main thread until SIGINT/SIGTERM; ``announce`` gets the URL once up."""
    sock = bind_socket(host, port)
    url = url_for(sock)
    provider.issuer = url
    server = uvicorn.Server(_config(create_app(provider), log_level))

    async def main() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            announce(url)
        await serving

    try:
        asyncio.run(main())
    finally:
        sock.close()
