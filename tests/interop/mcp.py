"""Start and query the test MCP server (tests/interop/mcp_server) in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from broker.sandbox.server import bind_socket, url_for
from tests.cluster import wait_for

__all__ = ["McpServer"]

ROOT = Path(__file__).resolve().parent.parent.parent


class McpServer:
    """The ``mcp`` package's authorization server and resource, on loopback."""

    def __init__(self, workdir: Path, access_seconds: int = 30, *, cimd: bool = False) -> None:
        sock = bind_socket("127.0.0.1", 0)
        self.url = url_for(sock)
        self.mcp_url = f"{self.url}/mcp"
        self._log_path = workdir / ("mcp-server-cimd.log" if cimd else "mcp-server.log")
        with open(self._log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.interop.mcp_server.app", str(sock.fileno()), str(access_seconds),
                 *(["cimd"] if cimd else [])],
                pass_fds=[sock.fileno()], stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
                start_new_session=True)
        sock.close()
        wait_for(lambda: self._up(), 30, what="the MCP server to answer")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(self.log()[-2000:])
        try:
            return httpx.get(f"{self.url}/test/counts", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/test/counts", timeout=5).json()

    def counts(self) -> dict[str, int]:
        return dict(self.state()["counts"])

    def events(self, event: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.state()["events"] if (event is None or e["event"] == event)
                and (user is None or e.get("user") == user)]

    def call(self, token: str) -> httpx.Response:
        """The protected MCP endpoint with a bearer token."""
        return httpx.get(self.mcp_url, headers={"Authorization": f"Bearer {token}"}, timeout=5)

    def forget_clients(self) -> int:
        return int(httpx.post(f"{self.url}/test/forget-clients", timeout=5).json()["forgotten"])

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
