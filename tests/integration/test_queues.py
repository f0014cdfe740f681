"""Separate queues (issue 11, scenario 5): beat refreshes never make an
interactive resolve wait behind them, the scan sends no more than the workers
can start, and a pair is never sent twice while its refresh is queued.

Before: 40 due credentials, a 1 s provider and one worker of concurrency 2
made an unrelated user's ``resolve(timeout=10)`` time out with 16 tasks still
queued (the beat sent all 40 with a countdown, so one worker held them all).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.clock import utcnow
from broker.models import Credential, ObtainedVia
from broker.secret import Secret
from broker.servers import server_key
from tests.cluster import Cluster, wait_for, wait_for_beat_scans
from tests.integration.test_cluster import sign_in, store_of
from workers.celery.app import REFRESH_QUEUE

pytestmark = pytest.mark.integration

DUE = 40
ENV = {
    "CREDBROKER_REFRESH_SCAN_SECONDS": "0.5",
    "CREDBROKER_WORKER_SLOTS": "2",
    "CREDBROKER_SERVER_MAX_CONCURRENCY": "2",  # the limiter is not under test here
}
TX = server_key("tx", "https://tx.upstream.test/mcp")


def make_due(cluster: Cluster, sandbox: Any, users: list[str]) -> None:
    """Store a used, still-valid credential past its refresh point for each user."""
    store = store_of(cluster)
    now = utcnow()
    for u in users:
        sign_in(cluster, sandbox, u)
        cred = Credential(Secret(f"cbtest-due-{u}-0123456789"), ObtainedVia.TOKEN_EXCHANGE,
                          issued_at=now - timedelta(seconds=3000), expires_at=now + timedelta(seconds=600))
        store.put(u, TX, cred)
        store.touch(u, TX, now)
    store.engine.dispose()


def test_resolve_is_not_queued_behind_beat_refreshes(tmp_path: Path, sandbox: Any) -> None:
    c = Cluster(tmp_path, sandbox.url, extra_env=ENV)
    try:
        users = [f"due-{i:02d}" for i in range(DUE)]
        make_due(c, sandbox, users)
        sign_in(c, sandbox, "zed")  # unrelated: no credential yet, so a mint
        sandbox.provider.set_latency("token", 1000)
        c.start_worker("w1", concurrency=2)
        depths: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                depths.append(int(c.redis.llen(REFRESH_QUEUE)))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        c.start_beat()

        def exchanged() -> dict[str, int]:
            by_user = sandbox.provider.stats()["by_user"]
            return {u: by_user.get(u, {}).get("token_exchange", 0) for u in users}

        # The refresh backlog is running: both slots busy with 1 s provider calls.
        wait_for(lambda: sum(exchanged().values()) >= 4, 30, what="beat refreshes to run")
        with c.client() as client:
            started = time.monotonic()
            resolved = client.resolve("zed", "tx", timeout=10)
            elapsed = time.monotonic() - started
        print(f"resolve {elapsed:.2f}s; refreshes still due {DUE - sum(1 for n in exchanged().values() if n)}")
        assert resolved.value.reveal().startswith("Bearer ")
        left = DUE - sum(1 for n in exchanged().values() if n)
        assert left >= 10, "the backlog must still be there for the resolve to prove anything"
        # one slot frees within 1 s, then the resolve goes first; its own mint takes 1 s
        assert elapsed < 3.5, f"resolve took {elapsed:.1f}s with {left} refreshes still due"

        # Every due credential is renewed exactly once: no pair sent twice
        # while its refresh was queued, none lost.
        wait_for(lambda: all(exchanged().values()), 60, 0.2, what="every due credential to be renewed")
        wait_for_beat_scans(c.redis, 3)  # three more scans: nothing may be sent again
        stop.set()
        watcher.join(2)
        counts = exchanged()
        print(f"max refresh queue depth {max(depths)}; exchanges per user {sorted(set(counts.values()))}")
        assert set(counts.values()) == {1}, counts
        # The scan sent at most what the workers could start: no backlog of 40.
        assert max(depths) <= 8, max(depths)
    finally:
        c.stop()
