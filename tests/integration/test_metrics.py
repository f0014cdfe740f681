"""/metrics is prometheus_client's, read back with prometheus_client's own parser.

The API app runs in this process over a real Redis of our own (so the
cluster-wide hash is ours alone); worker-side counts are made with the same
``cluster_incr`` the tasks use, from several processes at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.settings import load_settings
from tests.faults import PrivateRedis
from workers.api import create_app

pytestmark = pytest.mark.integration

KEY = "metrics-test-key-0123456789abcdef"
# Every name the hand-rolled exporter served, with its type: the names did not change.
PER_PROCESS = {
    "credbroker_http_requests": "counter",
    "credbroker_http_request_seconds": "histogram",
    "credbroker_connect_callbacks": "counter",
}
CLUSTER = {
    "credbroker_provider_calls": "counter",
    "credbroker_refreshes": "counter",
    "credbroker_beat_scans": "counter",
    "credbroker_credentials_due": "gauge",
    "credbroker_refresh_flights_sent": "counter",
}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            return await client.request(method, path, **kwargs)

    return anyio.run(go)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _count_in_workers(redis_url: str, processes: int, each: int) -> None:
    """Worker-side counting as the tasks do it, from several processes at once (prefork's case)."""
    code = ("import sys, redis\n"
            "from workers.metrics import cluster_incr, cluster_set\n"
            "r = redis.Redis.from_url(sys.argv[1])\n"
            "for _ in range(int(sys.argv[2])):\n"
            "    cluster_incr(r, 'credbroker_provider_calls_total', grant='refresh_token', result='success')\n"
            "cluster_incr(r, 'credbroker_refreshes_total', trigger='proactive', outcome='success')\n"
            "cluster_incr(r, 'credbroker_beat_scans_total')\n"
            "cluster_incr(r, 'credbroker_refresh_flights_sent_total', 2)\n"
            "cluster_set(r, 'credbroker_credentials_due', 7)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, redis_url, str(each)]) for _ in range(processes)]
    assert [p.wait(timeout=60) for p in procs] == [0] * processes


def test_metrics_parse_with_prometheus_client_and_keep_their_names(private_redis: PrivateRedis,
                                                                   tmp_path: Path) -> None:
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps({"servers": [{"name": "tx", "url": "https://tx.test/mcp", "auth_broker": {
        "mode": "token_exchange", "token_endpoint": "https://idp.test/token"}}]}))
    settings = load_settings({"CREDBROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}",
                              "CREDBROKER_REDIS_URL": private_redis.url, "CREDBROKER_API_KEYS": KEY,
                              "CREDBROKER_SERVERS_FILE": str(servers)}, env_file=None)
    _count_in_workers(private_redis.url, processes=4, each=25)
    app = create_app(settings)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        call(app, "GET", "/healthz")
        call(app, "GET", "/v1/connect/callback?state=nope&code=x")
        assert call(app, "GET", "/metrics").status_code == 401
        answer = call(app, "GET", "/metrics", headers=auth)
    finally:
        app.state.api.close()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    parsed = families(answer.text)
    for name, kind in {**PER_PROCESS, **CLUSTER}.items():
        assert name in parsed, f"{name} missing from /metrics"
        assert parsed[name].type == kind, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parsed.values() for s in f.samples}
    # 4 worker processes x 25 calls, each counted once, cluster-wide.
    assert samples[("credbroker_provider_calls_total", (("grant", "refresh_token"), ("result", "success")))] == 100
    assert samples[("credbroker_refreshes_total", (("outcome", "success"), ("trigger", "proactive")))] == 4
    assert samples[("credbroker_beat_scans_total", ())] == 4
    assert samples[("credbroker_refresh_flights_sent_total", ())] == 8
    assert samples[("credbroker_credentials_due", ())] == 7
    assert sum(s.value for s in parsed["credbroker_connect_callbacks"].samples) >= 1
    assert samples[("credbroker_http_requests_total", (("method", "GET"), ("route", "/healthz"),
                                                       ("status", "200")))] >= 1
    buckets = [s for s in parsed["credbroker_http_request_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["le"] for s in buckets} >= {"0.0005", "30.0", "+Inf"}
    assert not any(s.name.endswith("_created") for f in parsed.values() for s in f.samples)


def test_several_api_processes_behind_one_port_serve_the_sum(tmp_path: Path) -> None:
    """prometheus_client's multi-process mode: PROMETHEUS_MULTIPROC_DIR shared by the processes."""
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    count = ("from workers.metrics import METRICS\n"
             "for _ in range(10):\n"
             "    METRICS.inc('credbroker_resolves_total', outcome='ok', path='fast')\n"
             "METRICS.observe('credbroker_resolve_seconds', 0.002, path='fast')\n")
    for _ in range(3):
        subprocess.run([sys.executable, "-c", count], env=env, check=True, timeout=60)
    shown = subprocess.run([sys.executable, "-c", "from workers.metrics import METRICS; print(METRICS.render())"],
                           env=env, check=True, timeout=60, capture_output=True, text=True).stdout
    parsed = families(shown)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parsed["credbroker_resolves"].samples}
    assert values[("credbroker_resolves_total", (("outcome", "ok"), ("path", "fast")))] == 30
    count_sample = next(s for s in parsed["credbroker_resolve_seconds"].samples if s.name.endswith("_count"))
    assert count_sample.value == 3
