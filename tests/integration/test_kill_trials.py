"""SIGKILL of a worker's pool process at random points of a refresh, against a
provider that rotates refresh tokens (with a reuse interval, as Auth0 and Okta
offer). ``CREDBROKER_KILL_TRIALS`` sets the count: 12 in CI, 100 for the full run
(``CREDBROKER_KILL_TRIALS=100 python -m pytest tests/integration/test_kill_trials.py``)."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker.models import CredentialStatus
from broker.servers import server_key
from tests.cluster import Cluster, wait_for
from tests.integration.test_cluster import connect, store_of


TRIALS = int(os.environ.get("CREDBROKER_KILL_TRIALS", "12"))
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(60 + TRIALS * 6)]
GH_KEY = server_key("gh", "https://gh.upstream.test/mcp")


def pool_children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_kill_during_refresh_loses_nothing(tmp_path: Path, sandbox: Any) -> None:
    sandbox.provider.configure(access_token_ttl=2, rotate_refresh_tokens=True, refresh_reuse_grace=30)
    sandbox.provider.set_latency("token", 40)
    # A short lease (1 s call budget + 1 s margin): a flight killed mid-call holds
    # the row for that long, then the next flight presents the token once more.
    c = Cluster(tmp_path, sandbox.url, extra_env={
        "CREDBROKER_NEAR_EXPIRY_SECONDS": "0.2", "CREDBROKER_REFRESH_FRACTION": "0.3",
        "CREDBROKER_HTTP_CONNECT_TIMEOUT": "0.5", "CREDBROKER_HTTP_READ_TIMEOUT": "1",
        "CREDBROKER_PROVIDER_MAX_ATTEMPTS": "1", "CREDBROKER_PROVIDER_RETRY_SECONDS": "0",
        "CREDBROKER_LEASE_MARGIN_SECONDS": "1"})
    rng = random.Random(7)
    counts: Counter[str] = Counter()
    try:
        worker = c.start_worker("w1", concurrency=1)
        connect(c, "kim")
        with c.client() as client:
            client.resolve("kim", "gh", timeout=20)
            for trial in range(TRIALS):
                store = store_of(c)
                before = store.get("kim", GH_KEY)
                store.engine.dispose()
                assert before is not None
                # wait until the credential is past its refresh point, then resolve and kill
                wait_for(lambda: not _fresh(c), 5, 0.02, what="refresh point")
                c.redis.delete(*(c.redis.keys("credbroker:cache:*") or [b"-"]))
                result: dict[str, Any] = {}
                t = threading.Thread(target=lambda: result.setdefault("r", _safe(client)))
                t.start()
                delay = rng.uniform(0.0, 0.12)
                killed = threading.Event()
                def killer() -> None:
                    wait_for(lambda: c.redis.keys("credbroker:flight:*"), 10, 0.002, what="a flight")
                    threading.Event().wait(delay)
                    for child in pool_children(worker.pid):
                        os.kill(child, signal.SIGKILL)
                        killed.set()
                k = threading.Thread(target=killer)
                k.start()
                k.join(15)
                t.join(30)
                counts["killed"] += killed.is_set()
                r = result.get("r")
                assert r is not None and not isinstance(r, Exception), (trial, r)
                counts["ok"] += 1
                # the pool is back: the next resolve works and the store holds a good record
                wait_for(lambda: pool_children(worker.pid), 20, what="pool restarted")
                store = store_of(c)
                after = store.get("kim", GH_KEY)
                store.engine.dispose()
                assert after is not None and after.status is CredentialStatus.CONNECTED, (trial, after)
                counts["refreshed"] += after.version > before.version
                refreshes = sandbox.provider.stats()["grants"]["refresh_token"]
                counts["provider_refreshes_this_trial_max"] = max(
                    counts["provider_refreshes_this_trial_max"], refreshes - counts["provider_refreshes"])
                counts["provider_refreshes"] = refreshes
        stats = sandbox.provider.stats()
    finally:
        c.stop()
    assert counts["ok"] == TRIALS
    assert counts["refreshed"] == TRIALS, counts  # every trial's refresh landed in the store
    assert counts["killed"] >= TRIALS * 0.8
    assert stats["errors"].get("invalid_grant", 0) == 0, stats
    assert stats["reuse_detected"] == 0
    # a refresh token is re-presented only after a kill lost the response
    assert stats["grace_reuses"] <= counts["killed"], (stats, counts)
    print(f"\nkill trials: {TRIALS}, kills landed: {counts['killed']}, refreshes: "
          f"{stats['grants']['refresh_token']}, re-presented after a lost response: {stats['grace_reuses']}, "
          f"{dict(counts)}")


def _fresh(c: Cluster) -> bool:
    from datetime import timedelta

    from broker.clock import utcnow
    from broker.models import refresh_point

    store = store_of(c)
    rec = store.get("kim", GH_KEY)
    store.engine.dispose()
    assert rec is not None
    point = refresh_point(rec.credential.issued_at, rec.credential.expires_at, timedelta(seconds=0.2), 0.3)
    return point is not None and utcnow() < point


def _safe(client: Any) -> Any:
    try:
        return client.resolve("kim", "gh", timeout=25)
    except Exception as exc:  # noqa: BLE001
        return exc
