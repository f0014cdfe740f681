"""Flights as an operator sees them in Flower: a provider failure is a
FAILURE with a secret-free exception, expected answers stay SUCCESS, callers
still get the right error, and no audit-mover task buries the flights."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Any

import httpx
import pytest

from broker.errors import NotConnected, UpstreamError
from tests.cluster import Cluster, wait_for
from tests.integration.test_beat import _flower_up
from tests.integration.test_cluster import sign_in
from tests.secrets import find_leaks

pytestmark = pytest.mark.integration
AUTH = ("ops", "flower-pass-123")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metas(cluster: Cluster) -> list[dict[str, Any]]:
    out = []
    for key in cluster.redis.scan_iter(b"celery-task-meta-cbf-*"):
        raw = cluster.redis.get(key)
        if raw:
            out.append(json.loads(raw))
    return out


def test_failures_are_failures_answers_are_successes(tmp_path, sandbox) -> None:  # type: ignore[no-untyped-def]
    cluster = Cluster(tmp_path, sandbox.url, extra_env={"CREDBROKER_PROVIDER_RETRY_SECONDS": "0.2"})
    port = _free_port()
    try:
        cluster.start_worker(concurrency=2)
        cluster.start_beat()
        cluster._spawn("flower", ["-m", "celery", "-A", "workers.celery_app", "flower", f"--port={port}",
                                  "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}"])
        sign_in(cluster, sandbox, "fay")
        sandbox.provider.set_fault("token", "5xx")
        with cluster.client() as client:
            with pytest.raises(UpstreamError) as info:
                client.resolve("fay", "tx", timeout=20)
            assert info.value.status is not None and info.value.status >= 500
            with pytest.raises(NotConnected):
                client.resolve("fay", "gh", timeout=20)
            sandbox.provider.set_fault("token", None)
            client.resolve("fay", "obo", timeout=20)
        states = sorted((m["status"], (m["result"].get("exc_type") if m["status"] == "FAILURE" else None))
                        for m in _metas(cluster))
        assert states.count(("FAILURE", "FlightFailed")) >= 1
        assert ("SUCCESS", None) in states  # not_connected and the good mint
        failure = next(m for m in _metas(cluster) if m["status"] == "FAILURE")
        assert failure["result"]["exc_message"][0].startswith("UpstreamError: 5")

        wait_for(lambda: _flower_up(port), 30, 0.2, what="flower")

        def flower_tasks() -> dict[str, Any]:
            r = httpx.get(f"http://127.0.0.1:{port}/api/tasks", auth=AUTH, timeout=10)
            return r.json() if r.status_code == 200 else {}

        # Flower only sees tasks after it connected: run one failure and one answer now.
        sandbox.provider.set_fault("token", "5xx")
        with cluster.client() as client:
            with pytest.raises(UpstreamError):
                client.resolve("fay", "tx", timeout=20)
            with pytest.raises(NotConnected):
                client.resolve("fay", "gh", timeout=20)
        sandbox.provider.set_fault("token", None)
        tasks = wait_for(lambda: (lambda t: t if {v.get("state") for v in t.values()} >= {"FAILURE", "SUCCESS"}
                                  else None)(flower_tasks()), 20, 0.2, what="flower to show both states")
        failed = [v for v in tasks.values() if v.get("state") == "FAILURE"]
        assert failed and all(str(v.get("exception", "")).startswith("UpstreamError: 5") for v in failed), failed
        names = {v.get("name") for v in tasks.values()}
        assert "broker.persist_audit" not in names  # housekeeping is no longer a task per second
        assert find_leaks(json.dumps(tasks)) == []
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser:  # as an operator sees it: the rendered task page in a real headless browser
            task_id = next(k for k, v in tasks.items() if v.get("state") == "FAILURE")
            page = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                                   "--virtual-time-budget=5000", "--dump-dom",
                                   f"http://{AUTH[0]}:{AUTH[1]}@127.0.0.1:{port}/task/{task_id}"],
                                  capture_output=True, timeout=60).stdout.decode(errors="replace")
            assert "FAILURE" in page and "UpstreamError: 5" in page, page[-2000:]
            assert find_leaks(page) == []
    finally:
        cluster.stop()
