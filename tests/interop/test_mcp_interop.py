"""An MCP server added by its URL alone, against the ``mcp`` package's server side.

The test MCP server (tests/interop/mcp_server) is the SDK's authorization
code: RFC 9728 metadata and the 401 pointer, RFC 8414 metadata, RFC 7591
registration, authorize, token and revoke. The broker's servers file names
it by ``name``, ``url`` and ``discover: mcp`` only. A real cluster: Redis,
Celery worker processes, the HTTP API under uvicorn. Every count is read at
the MCP server.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select

from broker.db import make_engine
from broker.registrations import registered_clients
from sandbox.server import bind_socket, url_for
from broker.servers import servers_from_settings
from tests.cluster import Cluster, redis_available
from tests.conftest import missing_service
from tests.integration.test_api import KEY, Api, Served
from tests.interop.dot import walk
from tests.interop.mcp import McpServer
from tests.secrets import assert_no_leak, register
from workers.api.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.interop]

SERVER = "mcp"
BURST = "mcp-burst"  # the same MCP server under another name: a server of its own, undiscovered
BURST_USERS = 50
DISCOVERY = ("GET /.well-known/oauth-protected-resource/mcp", "GET /.well-known/oauth-authorization-server")


def browse(connect_url: str, user: str, max_hops: int = 8) -> httpx.Response:
    """The user's browser: the broker's connect URL, the MCP server's authorize, back to the callback.

    The MCP test server approves for the user named in ``X-Test-User`` (its login page).
    """
    with httpx.Client(timeout=20, trust_env=False, follow_redirects=False,
                      headers={"X-Test-User": user}) as browser:
        return walk(browser, browser.get(connect_url), max_hops)


@dataclass
class McpInterop:
    server: McpServer
    cluster: Cluster
    sock_url: str
    served: Served
    api: Api
    seen: list[str]

    def connect(self, user: str, server: str = SERVER) -> httpx.Response:
        started = self.api("POST", "/v1/connect", json={"user_id": user, "server": server})
        assert started.status_code == 200, started.text
        return browse(started.json()["connect_url"], user)

    def resolve_token(self, user: str, server: str = SERVER) -> str:
        r = self.api.resolve(user, server)
        assert r.status_code == 200, r.text
        token = str(r.json()["value"]).removeprefix("Bearer ")
        self.seen.append(token)
        return token

    def restart_broker(self) -> None:
        """Every broker process: the worker processes and the API."""
        for name in list(self.cluster.procs):
            self.cluster.kill(name)
        self.served.stop()
        self.api.close()
        sock = bind_socket("127.0.0.1", int(urlsplit(self.sock_url).port or 0))
        self.served = Served(create_app(self.cluster.settings), sock)
        self.api = Api(self.served.url)
        self.cluster.start_worker("w1", concurrency=2)
        self.cluster.start_worker("w2", concurrency=2)


@pytest.fixture(scope="module")
def mcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpInterop]:
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    workdir: Path = tmp_path_factory.mktemp("mcp")
    server = McpServer(workdir, access_seconds=30)
    sock = bind_socket("127.0.0.1", 0)
    api_url = url_for(sock)
    cluster = served = None
    try:
        # The broker's whole knowledge of the MCP server: its URL.
        entries: list[dict[str, Any]] = [{"name": n, "url": server.mcp_url, "discover": "mcp"} for n in (SERVER, BURST)]
        # 30 s access tokens renewed 60 s before expiry: every resolve of a connected user refreshes.
        cluster = Cluster(workdir, server.url, servers=entries, extra_env={
            "CREDBROKER_API_KEYS": KEY, "CREDBROKER_PUBLIC_URL": api_url, "CREDBROKER_NEAR_EXPIRY_SECONDS": "60"})
        cluster.start_worker("w1", concurrency=2)
        cluster.start_worker("w2", concurrency=2)
        served = Served(create_app(cluster.settings), sock)
        interop = McpInterop(server, cluster, api_url, served, Api(served.url), [])
        yield interop
        interop.api.close()
        served = interop.served
        assert_no_leak(cluster.all_logs(), "broker logs")
    finally:
        if served is not None:
            served.stop()
        if cluster is not None:
            cluster.stop()
        server.stop()


@pytest.fixture(autouse=True)
def register_seen_tokens(mcp: McpInterop) -> Iterator[None]:
    yield
    for token in mcp.seen:
        register(token)
    mcp.seen.clear()


def test_fifty_concurrent_first_resolves_cause_one_discovery_and_one_registration(mcp: McpInterop) -> None:
    before = mcp.server.counts()

    def first(i: int) -> httpx.Response:
        with Api(mcp.served.url) as api:
            return api.resolve(f"burst-{i}", BURST)

    with concurrent.futures.ThreadPoolExecutor(BURST_USERS) as pool:
        answers = list(pool.map(first, range(BURST_USERS)))

    after = mcp.server.counts()
    assert [r.status_code for r in answers] == [409] * BURST_USERS, [r.text for r in answers if r.status_code != 409]
    assert {r.json()["reason"] for r in answers} == {"never_connected"}
    assert all(r.json()["connect_url"].startswith(f"{mcp.sock_url}/v1/connect/") for r in answers)
    assert after.get("register", 0) - before.get("register", 0) == 1
    for path in DISCOVERY:
        assert after.get(path, 0) - before.get(path, 0) == 1, path
    assert after.get("GET /mcp", 0) - before.get("GET /mcp", 0) == 1  # the probe


def test_two_users_connect_resolve_refresh_and_disconnect(mcp: McpInterop) -> None:
    tokens: dict[str, str] = {}
    for user in ("alice", "bob"):
        never = mcp.api.resolve(user, SERVER)
        assert never.status_code == 409 and never.json()["reason"] == "never_connected"
        page = mcp.connect(user)
        assert page.status_code == 200 and "Connected" in page.text, page.text[:300]
        tokens[user] = mcp.resolve_token(user)  # 30 s tokens: this resolve already refreshes
    for user, token in tokens.items():
        who = mcp.server.call(token)
        assert who.status_code == 200 and who.json()["user"] == user
    (code_alice,) = mcp.server.events("code", "alice")
    assert code_alice["resource"] == mcp.server.mcp_url  # RFC 8707: the server's canonical URL
    assert len(mcp.server.events("refresh", "alice")) == 1 and len(mcp.server.events("refresh", "bob")) == 1
    again = mcp.resolve_token("alice")
    assert again != tokens["alice"] and mcp.server.call(again).json()["user"] == "alice"
    assert len(mcp.server.events("refresh", "alice")) == 2

    assert mcp.api("DELETE", f"/v1/users/alice/credentials/{SERVER}").status_code == 204

    assert mcp.server.events("revoke", "alice"), mcp.server.counts()
    assert mcp.server.call(again).status_code == 401  # revoked at the MCP server
    assert mcp.api.listing("alice")[SERVER]["status"] == "not_connected"
    assert mcp.server.call(mcp.resolve_token("bob")).json()["user"] == "bob"  # bob untouched


def test_registered_client_survives_a_restart_of_every_process(mcp: McpInterop) -> None:
    mcp.connect("carol")
    first = mcp.resolve_token("carol")
    before = mcp.server.counts()
    engine = make_engine(mcp.cluster.settings.database_url)
    key = servers_from_settings(mcp.cluster.settings).get_server(SERVER).key
    with engine.connect() as conn:
        row = conn.execute(select(registered_clients).where(registered_clients.c.server_key == key)).one()
    engine.dispose()
    assert row.status == "ready" and b"client_secret" not in bytes(row.ciphertext)
    assert b"credential-broker" not in bytes(row.ciphertext)  # sealed, not plain JSON

    mcp.restart_broker()

    renewed = mcp.resolve_token("carol")
    assert renewed != first and mcp.server.call(renewed).json()["user"] == "carol"
    mcp.connect("dave")  # a new user after the restart: same client, no new registration
    assert mcp.server.call(mcp.resolve_token("dave")).json()["user"] == "dave"
    after = mcp.server.counts()
    assert after.get("register", 0) == before.get("register", 0)
    for path in DISCOVERY:
        assert after.get(path, 0) == before.get(path, 0), path


def test_a_server_that_forgets_its_clients_gets_one_new_registration(mcp: McpInterop) -> None:
    mcp.connect("erin")
    assert mcp.server.forget_clients() >= 1  # e.g. the MCP server restarted with in-memory storage
    before = mcp.server.counts().get("register", 0)

    # The refresh is refused with invalid_client: the still-valid token is served stale.
    stale = mcp.api.resolve("erin", SERVER)
    assert stale.status_code == 200, stale.text
    assert mcp.server.counts().get("register", 0) == before  # registering again waits for a use

    page = mcp.connect("erin")
    assert page.status_code == 200 and "Connected" in page.text, page.text[:300]
    assert mcp.server.call(mcp.resolve_token("erin")).json()["user"] == "erin"
    assert mcp.server.counts().get("register", 0) == before + 1


def test_servers_discover_prints_what_it_found_without_registering(mcp: McpInterop) -> None:
    import subprocess
    import sys

    before = mcp.server.counts().get("register", 0)
    out = subprocess.run([sys.executable, "-m", "workers.cli.main", "servers", "discover", mcp.server.mcp_url],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr
    assert f"{mcp.server.url}/token" in out.stdout and f"{mcp.server.url}/register" in out.stdout
    assert "S256" in out.stdout and "discover: mcp" in out.stdout
    assert_no_leak(out.stdout + out.stderr, "servers discover output")
    assert mcp.server.counts().get("register", 0) == before

