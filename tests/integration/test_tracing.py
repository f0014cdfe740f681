"""One trace per resolve miss: API request, task publish, task run, provider call.

The API runs in this process with OpenTelemetry's in-memory exporter; the
worker is a real Celery worker in its own process (tracing configured by
``CREDBROKER_TRACING=jsonl:PATH``), and the provider is the sandbox over HTTP.
Both halves must land in one trace, parent by parent, and no span attribute may
hold a token, the client secret or the API key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from tests.cluster import Cluster, wait_for  # noqa: E402
from tests.faults import PrivateRedis  # noqa: E402
from tests.secrets import register  # noqa: E402
from workers import tracing  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "tracing-test-key-0123456789abcdef"
CLIENT_SECRET = "sandbox-client-secret-s3cr3t"


@pytest.fixture
def traced_cluster(tmp_path: Path, sandbox: Any) -> Iterator[tuple[Cluster, Path]]:
    private = PrivateRedis(tmp_path)
    private.start()
    spans = tmp_path / "worker-spans.jsonl"
    cluster = Cluster(tmp_path, sandbox.url, redis_url=private.url,
                      extra_env={"CREDBROKER_API_KEYS": KEY, "CREDBROKER_TRACING": f"jsonl:{spans}"})
    try:
        yield cluster, spans
    finally:
        cluster.stop()
        private.stop()


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test",
                                     timeout=60) as client:
            return await client.request(method, path, **kwargs)

    return anyio.run(go)


def _span_id(value: int) -> str:
    return f"0x{value:016x}"


def test_a_resolve_miss_is_one_trace_from_api_to_provider(traced_cluster: tuple[Cluster, Path],
                                                          sandbox: Any) -> None:
    cluster, spans_file = traced_cluster
    cluster.start_worker(concurrency=1)
    from workers.api import create_app

    memory = InMemorySpanExporter()
    tracing.setup_tracing("credbroker-api", {}, exporter=memory)
    try:
        app = create_app(cluster.settings)
        try:
            auth = {"Authorization": f"Bearer {KEY}"}
            subject = httpx.post(f"{sandbox.url}/test/subject-token", json={"user_id": "alice", "ttl": 3600},
                                 timeout=10).json()["access_token"]
            register(subject)
            assert call(app, "PUT", "/v1/users/alice/subject-token", json={"token": subject},
                        headers=auth).status_code == 204
            answer = call(app, "POST", "/v1/resolve", json={"user_id": "alice", "server": "tx"}, headers=auth)
            assert answer.status_code == 200, answer.text
            token = register(answer.json()["value"].split(" ", 1)[1])
        finally:
            app.state.api.close()
    finally:
        tracing.reset_tracing()

    api_spans = [json.loads(s.to_json()) for s in memory.get_finished_spans()]
    server = next(s for s in api_spans if s["kind"] == "SpanKind.SERVER" and "/v1/resolve" in s["name"])
    trace_id = server["context"]["trace_id"]
    publish = next(s for s in api_spans if s["name"].startswith("apply_async/broker.resolve"))
    assert publish["context"]["trace_id"] == trace_id

    def worker_spans() -> list[dict[str, Any]] | None:
        if not spans_file.exists():
            return None
        found = [json.loads(line) for line in spans_file.read_text().splitlines() if line]
        ours = [s for s in found if s["context"]["trace_id"] == trace_id]
        return ours if any(s["kind"] == "SpanKind.CLIENT" for s in ours) else None

    worker = wait_for(worker_spans, 20, what="the worker's spans of the resolve's trace")
    run = next(s for s in worker if s["name"].startswith("run/broker.resolve"))
    provider = next(s for s in worker if s["kind"] == "SpanKind.CLIENT")
    # One trace, parent by parent: API request > publish > task run > provider call.
    assert run["parent_id"] == publish["context"]["span_id"]
    assert provider["parent_id"] == run["context"]["span_id"]
    assert provider["attributes"].get("http.request.method", provider["attributes"].get("http.method")) == "POST"
    url = provider["attributes"].get("url.full", provider["attributes"].get("http.url"))
    assert url == f"{sandbox.url}/token"
    assert run["resource"]["attributes"]["service.name"] == "credbroker-worker"

    everything = json.dumps(api_spans + worker)
    for secret in (subject, token, CLIENT_SECRET, KEY):
        assert secret not in everything, "a secret reached a span"
    assert "alice" not in json.dumps([s["attributes"] for s in api_spans + worker if s["kind"] == "SpanKind.CLIENT"])


def test_tracing_is_off_unless_configured() -> None:
    assert tracing.tracing_mode({}) is None
    assert tracing.tracing_mode({"CREDBROKER_TRACING": "off"}) is None
    assert tracing.setup_tracing("x", {}) is None
    assert tracing.tracing_mode({"CREDBROKER_TRACING": "jsonl:/tmp/s.jsonl"}) == "jsonl:/tmp/s.jsonl"
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="CREDBROKER_TRACING: expected otlp, console or jsonl:PATH"):
        tracing.tracing_mode({"CREDBROKER_TRACING": "jaeger"})
