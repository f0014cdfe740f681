"""A rolling master-key rotation keeps open connect links and in-flight flights working.

Its own module: the cluster here must not share its Redis database (and so its
task queue) with another module's cluster that is still running.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from broker.sandbox import SandboxProvider, run_sandbox
from broker.sandbox.server import bind_socket, url_for
from broker.servers import servers_from_settings
from broker.settings import load_settings
from tests.cluster import Cluster, redis_available, wait_for
from tests.conftest import missing_service
from tests.integration.connect_browser import ConnectBrowser
from tests.integration.test_api import KEY, Api, Served
from tests.secrets import register
from workers.api import create_app

pytestmark = pytest.mark.integration


def test_rolling_master_key_rotation_keeps_links_and_flights_working(tmp_path: Path) -> None:
    """New key first, then the API and the workers restarted one by one, with no
    TRANSPORT_KEY (the transport key derived from the master keys)."""
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    sandbox = run_sandbox(SandboxProvider())
    old = f"old:{base64.b64encode(os.urandom(32)).decode()}"
    new = f"new:{base64.b64encode(os.urandom(32)).decode()}"
    sock = bind_socket("127.0.0.1", 0)
    cluster = Cluster(tmp_path, sandbox.url, extra_env={
        "CREDBROKER_API_KEYS": KEY, "CREDBROKER_PUBLIC_URL": url_for(sock), "CREDBROKER_TRANSPORT_KEY": "",
        "CREDBROKER_MASTER_KEYS": old})
    servers: list[Served] = []
    clients: list[Api] = []
    try:
        cluster.start_worker("w1", concurrency=2)
        servers.append(Served(create_app(cluster.settings), sock))
        api1 = Api(servers[0].url)
        clients.append(api1)
        token = register(sandbox.provider.issue_subject_token("rot-bob", ttl=3600))
        assert api1("PUT", "/v1/users/rot-bob/subject-token", json={"token": token}).status_code == 204
        link = api1("POST", "/v1/connect", json={"user_id": "rot-alice", "server": "gh"}).json()["connect_url"]
        sandbox.provider.set_latency("token", 1500)  # a flight in progress across the API's restart
        first: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: first.update(r=api1.resolve("rot-bob", "tx")))
        waiter.start()
        from workers.constants import flight_key

        tx_key = servers_from_settings(cluster.settings)["tx"].key
        wait_for(lambda: cluster.redis.exists(flight_key("rot-bob", tx_key)), 10, what="the flight to start")

        # The API restarts with the new key first (the old one kept, to decrypt).
        cluster.env["CREDBROKER_MASTER_KEYS"] = f"{new},{old}"
        rotated = load_settings(cluster.env, env_file=None)
        servers.append(Served(create_app(rotated), bind_socket("127.0.0.1", 0)))
        api2 = Api(servers[1].url)
        clients.append(api2)
        joined = api2.resolve("rot-bob", "tx")  # joins the flight a worker with only the old key runs
        waiter.join(20)
        sandbox.provider.set_latency("token", 0)
        assert joined.status_code == 200, joined.text
        assert first["r"].status_code == 200, first["r"].text
        assert first["r"].json()["value"] == joined.json()["value"]
        register(joined.json()["value"].removeprefix("Bearer "))
        assert len([r for r in sandbox.provider.requests("token") if r["grant_type"].endswith("token-exchange")]) == 1

        # The first API process restarts too, at its address, with the new key first: the link
        # handed out before the rotation (sealed under the old key) still completes.
        servers[0].stop()
        port = urlsplit(servers[0].url).port or 0
        servers[0] = Served(create_app(rotated), bind_socket("127.0.0.1", port))
        with ConnectBrowser() as browser:
            page = browser.consent(link, user="rot-alice-upstream")
            assert page.status_code == 200, page.text
            assert browser.confirm(page).status_code == 200
        # Then the worker restarts with the new key too; everything still resolves.
        cluster.kill("w1", signal.SIGTERM)
        cluster.start_worker("w2", concurrency=2)
        gh = api2.resolve("rot-alice", "gh")
        assert gh.status_code == 200 and gh.json()["obtained_via"] == "connect_flow", gh.text
        again = api2.http.post("/v1/resolve", json={"user_id": "rot-bob", "server": "tx"})  # the raw answer
        assert again.json()["value"] == joined.json()["value"]  # served from the cache w1 sealed
    finally:
        for client in clients:
            client.close()
        for served in servers:
            served.stop()
        cluster.stop()
        sandbox.stop()
