"""Pre-warming on a real cluster: a warm at sign-in mints every exchange/OBO
server once and later resolves take the fast path with no provider call; the
warm API's skip reasons; a bulk warm of 1,000 users while resolves run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.models import SubjectToken
from broker.secret import Secret
from broker.store import CredentialStore
from tests.cluster import Cluster, wait_for
from tests.integration.test_api import KEY, Api, Served
from tests.integration.test_cluster import sign_in, store_of
from tests.secrets import register
from workers.api import create_app
from workers.constants import cache_key
from workers.metrics import METRICS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BULK_USERS = int(os.environ.get("CREDBROKER_TEST_BULK_USERS", "1000"))


def grants(sandbox: Any, user: str) -> dict[str, int]:
    return dict(sandbox.provider.stats()["by_user"].get(user, {}))


def test_warm_at_sign_in_then_fast_path(tmp_path, sandbox) -> None:  # type: ignore[no-untyped-def]
    cluster = Cluster(tmp_path, sandbox.url, extra_env={"CREDBROKER_API_KEYS": KEY})
    served = None
    try:
        cluster.start_worker(concurrency=2)
        served = Served(create_app(cluster.settings))
        api = Api(served.url)
        token = register(sandbox.provider.issue_subject_token("wendy", ttl=3600))
        expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        r = api("PUT", "/v1/users/wendy/subject-token", json={"token": token, "expires_at": expires, "warm": True})
        assert r.status_code == 204
        servers = cluster.settings
        from broker.servers import servers_from_settings

        reg = servers_from_settings(servers)
        wait_for(lambda: all(cluster.redis.exists(cache_key("wendy", reg[n].key)) for n in ("tx", "obo")), 20,
                 what="both exchange credentials warmed into the cache")
        assert grants(sandbox, "wendy") == {"token_exchange": 1, "obo": 1}

        def fast() -> float:
            return METRICS.value("credbroker_resolves_total", outcome="ok", path="fast")

        before = fast()
        for _ in range(5):
            for name in ("tx", "obo"):
                assert api.resolve("wendy", name).status_code == 200
        assert fast() - before == 10  # every resolve was a cache hit
        assert grants(sandbox, "wendy") == {"token_exchange": 1, "obo": 1}

        # A warm of fresh credentials: queued, flown, and no provider call.
        r = api("POST", "/v1/warm", json={"user_id": "wendy"})
        assert r.status_code == 202
        body = r.json()
        assert body["queued"] == ["tx", "obo"]
        assert body["skipped"] == [{"server": "gh", "reason": "never_connected"}]
        with cluster.client() as client:
            assert client.warm("wendy", ["tx"]) == ["tx"]
            assert client.warm("nobody") == []
        wait_for(lambda: not cluster.redis.keys(b"credbroker:flight:*"), 10, what="warm flights to finish")
        assert grants(sandbox, "wendy") == {"token_exchange": 1, "obo": 1}

        r = api("POST", "/v1/warm", json={"user_id": "nobody", "servers": ["tx", "gh"]})
        assert r.status_code == 202
        assert r.json() == {"queued": [], "skipped": [{"server": "tx", "reason": "subject_token_missing"},
                                                      {"server": "gh", "reason": "never_connected"}]}
        assert api("POST", "/v1/warm", json={"user_id": "wendy", "servers": ["nope"]}).status_code == 404
        assert api("POST", "/v1/warm", json={"user_id": "wendy", "servers": "tx"}).status_code == 422
        assert api("PUT", "/v1/users/wendy/subject-token", json={"token": token, "warm": "yes"}).status_code == 422
        api.close()
    finally:
        if served is not None:
            served.stop()
        cluster.stop()


def _seed_users(store: CredentialStore, sandbox: Any, users: list[str]) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    for user in users:
        token = sandbox.provider.issue_subject_token(user, ttl=3600)
        store.put_subject_token(user, SubjectToken(Secret(register(token)), expires))


@pytest.mark.timeout(240)
def test_bulk_warm_of_many_users_while_resolves_run(tmp_path, sandbox, pg_url) -> None:  # type: ignore[no-untyped-def]
    users = [f"bulk-{i:05d}" for i in range(BULK_USERS)]
    cluster = Cluster(tmp_path, sandbox.url, database_url=pg_url)
    try:
        cluster.start_worker("w1", concurrency=16, pool="threads")
        cluster.start_worker("w2", concurrency=16, pool="threads")
        store = store_of(cluster)
        _seed_users(store, sandbox, users)
        store.engine.dispose()
        interactive = [f"live-{i}" for i in range(4)]
        for user in interactive:
            sign_in(cluster, sandbox, user)
        latencies: list[float] = []
        errors: list[str] = []
        stop = threading.Event()

        def resolve_loop(user: str) -> None:
            with cluster.client() as client:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        client.resolve(user, "tx", timeout=20)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(type(exc).__name__)
                    latencies.append(time.monotonic() - started)
                    # a new credential each round: drop it so every resolve is a miss (a flight)
                    from broker.servers import servers_from_settings

                    key = servers_from_settings(cluster.settings)["tx"].key
                    cluster.redis.delete(cache_key(user, key))
                    s = store_of(cluster)
                    s.delete(user, key)
                    s.engine.dispose()

        env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
        env.update(cluster.env)
        threads = [threading.Thread(target=resolve_loop, args=(u,), daemon=True) for u in interactive]
        for t in threads:
            t.start()
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "workers.cli", "warm", "--all-users", "--server", "tx",
                              "--window", "24", "--json"], env=env, cwd=ROOT, capture_output=True, timeout=200)
        elapsed = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(30)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        summary = json.loads(out.stdout)
        assert summary["users"] == BULK_USERS + 4 and summary["flights"] + summary["joined"] == BULK_USERS + 4
        assert summary["failed"] == {} and summary["skipped"] == {}
        per_user = sandbox.provider.stats()["by_user"]
        assert all(per_user[u]["token_exchange"] == 1 for u in users)
        assert not errors, errors[:5]
        latencies.sort()
        p95 = latencies[int(len(latencies) * 0.95)]
        print(f"bulk warm: {BULK_USERS + 4} flights in {elapsed:.1f}s; {len(latencies)} interactive resolves, "
              f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
              f"max {latencies[-1] * 1000:.0f} ms")
        assert len(latencies) >= 20
        assert p95 < 2.0
    finally:
        cluster.stop()
