"""Client ID Metadata Documents: an MCP server added by URL that accepts the broker's document URL as client id.

The ``mcp`` SDK has no server side for these documents, so the test server's
``get_client`` fetches and checks the document itself (tests/interop/mcp_server/app.py);
the rest of the authorization server is the SDK's. A cluster of its own (one
Celery worker, the API served at ``PUBLIC_URL`` so the document can be fetched).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from broker.sandbox.server import bind_socket, url_for
from tests.cluster import Cluster, redis_available
from tests.conftest import missing_service
from tests.integration.test_api import KEY, Api, Served
from tests.interop.mcp import McpServer
from tests.interop.test_mcp_interop import browse
from tests.secrets import register
from workers.api import create_app

pytestmark = [pytest.mark.integration, pytest.mark.interop]


def test_client_id_metadata_document_where_the_server_supports_it(tmp_path: Path) -> None:
    """No registration: the client id is the API's document URL, which the server fetches."""
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    server = McpServer(tmp_path, access_seconds=30, cimd=True)
    sock = bind_socket("127.0.0.1", 0)
    api_url = url_for(sock)
    cluster = Cluster(tmp_path, server.url, servers=[{"name": "cimd", "url": server.mcp_url, "discover": "mcp"}],
                      extra_env={"CREDBROKER_API_KEYS": KEY, "CREDBROKER_PUBLIC_URL": api_url})
    served = None
    try:
        cluster.start_worker("w1", concurrency=2)
        served = Served(create_app(cluster.settings), sock)
        document = httpx.get(f"{api_url}/v1/oauth/client-metadata.json", timeout=5)  # no bearer key needed
        assert document.status_code == 200
        assert document.json()["client_id"] == f"{api_url}/v1/oauth/client-metadata.json"
        assert document.json()["redirect_uris"] == [f"{api_url}/v1/connect/callback"]
        with Api(served.url) as api:
            started = api("POST", "/v1/connect", json={"user_id": "frank", "server": "cimd"})
            assert started.status_code == 200, started.text
            page = browse(started.json()["connect_url"], "frank")
            assert page.status_code == 200 and "Connected" in page.text, page.text[:300]
            r = api.resolve("frank", "cimd")
            assert r.status_code == 200, r.text
            token = str(r.json()["value"]).removeprefix("Bearer ")
            register(token)
            assert server.call(token).json() == {"user": "frank", "client_id": document.json()["client_id"]}
        counts = server.counts()
        assert counts.get("register", 0) == 0 and counts.get("cimd_fetch") == 1
        assert counts.get("POST /register", 0) == 0
    finally:
        if served is not None:
            served.stop()
        cluster.stop()
        server.stop()
