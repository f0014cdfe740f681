"""Two deployments on one Redis database. With their own CREDBROKER_NAMESPACE
they never take each other's tasks and every Redis name of each starts with
its namespace; sharing one, a worker refuses a flight of another servers
configuration with ``config_mismatch``, never ``unknown_server``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.errors import BrokerError, ConfigMismatch
from tests.cluster import Cluster, redis_available, sandbox_servers
from tests.conftest import missing_service
from tests.integration.test_cluster import sign_in

pytestmark = pytest.mark.integration

USERS = [f"ns-user-{i}" for i in range(8)]


def _servers(sandbox_url: str, prefix: str) -> list[dict[str, Any]]:
    """The sandbox servers under names of this deployment's own (as two folders
    set up independently would have)."""
    return [dict(s, name=prefix + s["name"]) for s in sandbox_servers(sandbox_url)]


@pytest.fixture
def two(tmp_path: Path, sandbox: Any, request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, Cluster]]:
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    namespaces: tuple[str, str] = request.param
    made: list[Cluster] = []
    try:
        for label, ns in zip(("a", "b"), namespaces):
            folder = tmp_path / label
            folder.mkdir()
            env = {"CREDBROKER_NAMESPACE": ns} if ns else {}
            # Both clusters on the one Redis database this test process locked.
            made.append(Cluster(folder, sandbox.url, servers=_servers(sandbox.url, label + "-"), extra_env=env))
        yield made[0], made[1]
    finally:
        for c in made:
            c.stop()


def _outcomes(c: Cluster, server: str) -> Counter[str]:
    out: Counter[str] = Counter()
    with c.client() as client:
        for u in USERS:
            try:
                client.resolve(u, server, timeout=15)
                out["ok"] += 1
            except BrokerError as exc:
                out[exc.code] += 1
    return out


@pytest.mark.parametrize("two", [("alpha", "beta")], indirect=True)
def test_namespaces_keep_deployments_apart(two: tuple[Cluster, Cluster], sandbox: Any) -> None:
    a, b = two
    for c in (a, b):
        c.start_worker()
        for u in USERS:
            sign_in(c, sandbox, u)
    assert _outcomes(a, "a-tx") == Counter(ok=8)
    assert _outcomes(b, "b-tx") == Counter(ok=8)
    # Control commands (the API's readiness ping) travel on namespaced channels too.
    with a.client() as client:
        replies = client.celery.control.ping(timeout=2.0)
    assert len(replies) == 1, replies
    # Every key, queue and result of each deployment sits under its namespace.
    names = [k.decode() for k in a.redis.scan_iter(count=1000)]
    assert names and all(n.startswith(("alpha:", "beta:")) for n in names), sorted(names)[:20]
    assert any(n.startswith("alpha:credbroker:cache:") for n in names)
    assert any(n.startswith("beta:credbroker:cache:") for n in names)
    assert any(n.startswith("alpha:celery-task-meta-") for n in names)
    assert "alpha:credbroker" in names or "alpha:_kombu.binding.credbroker" in names


@pytest.mark.parametrize("two", [("", "")], indirect=True)
def test_shared_namespace_other_config_is_refused_clearly(two: tuple[Cluster, Cluster], sandbox: Any) -> None:
    a, b = two
    for u in USERS:
        sign_in(a, sandbox, u)
    b.start_worker()  # only the other deployment's workers consume the shared queue
    with a.client() as client, pytest.raises(ConfigMismatch) as caught:
        client.resolve(USERS[0], "a-tx", timeout=15)
    assert caught.value.http_status == 503 and "CREDBROKER_NAMESPACE" in caught.value.message
    a.start_worker()
    # Both pools on one queue: a flight either reaches its own deployment or is
    # refused clearly; "unknown server" never reaches a caller.
    out = _outcomes(a, "a-tx")
    assert set(out) <= {"ok", "config_mismatch"} and sum(out.values()) == 8, out
