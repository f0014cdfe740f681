"""A token endpoint that accepts connections and never answers.

The sandbox's ``hang`` fault still runs an HTTP server that answers after a
while; a real hung upstream (a stuck load balancer, a wedged process) holds
the TCP connection open forever. This is that, on loopback: a listener that
accepts, keeps every socket open, reads nothing and writes nothing.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

__all__ = ["HungServer"]


class HungServer:
    """A loopback listener that accepts and never responds; counts connections."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(1024)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://{host}:{self.port}"
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hung-server", daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self._conns.append(conn)
            self.accepted += 1

    def start(self) -> HungServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self._conns:
            conn.close()
        self._sock.close()

    def __enter__(self) -> HungServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
