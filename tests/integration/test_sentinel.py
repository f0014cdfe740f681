"""Redis Sentinel: a cluster (workers and a client) on a master, a replica and
three sentinels of our own; the master is failed over (``SENTINEL FAILOVER``)
and then killed, under a stream of resolves that each rotate a refresh token.
Resolves keep succeeding after each failover, errors are clear and confined to
a short window, and the sandbox provider never receives a refresh token twice.

Short by default; ``CREDBROKER_TEST_SENTINEL_FULL=N`` runs N failover rounds
(alternating ``SENTINEL FAILOVER`` and a killed master) with more users.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker.errors import BrokerError
from tests.cluster import Cluster, wait_for
from tests.integration.test_cluster import connect
from tests.sentinel import SentinelSet

pytestmark = pytest.mark.integration

FULL = int(os.environ.get("CREDBROKER_TEST_SENTINEL_FULL", "0") or 0)
ROUNDS = ["failover", "kill"] if not FULL else ["failover" if i % 2 == 0 else "kill" for i in range(FULL)]
USERS = [f"sen-{i}" for i in range(4 if not FULL else 12)]
# Worst case from a failover's start to the first success after it: sentinel
# detection (1 s down-after), election, kombu and redis-py reconnecting.
RECOVERY_SECONDS = 20.0


class Stream:
    """Resolves in a loop from a few threads, every outcome timestamped."""

    def __init__(self, client: Any, users: list[str], threads: int = 3) -> None:
        self.client = client
        self.users = users
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.events: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self.stop.is_set():
            user = self.users[i % len(self.users)]
            i += 1
            try:
                self.client.resolve(user, "gh", timeout=5)
                outcome = "ok"
            except BrokerError as exc:
                outcome = exc.code
            with self.lock:
                self.events.append((time.monotonic(), outcome))
            if outcome != "ok":
                self.stop.wait(0.05)  # pace retries while Redis is away, as a gateway would

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def oks_since(self, since: float) -> int:
        with self.lock:
            return sum(1 for t, o in self.events if t >= since and o == "ok")

    def outcomes(self) -> Counter[str]:
        with self.lock:
            return Counter(o for _, o in self.events)


def _presented_twice(sandbox: Any) -> int:
    tokens = Counter(req.get("form", {}).get("refresh_token") for req in sandbox.provider.requests("token")
                     if req.get("form", {}).get("grant_type") == "refresh_token")
    return sum(n - 1 for n in tokens.values() if n > 1)


def test_sentinel_failover_under_resolves(tmp_path: Path, sandbox: Any) -> None:
    sentinels = SentinelSet(tmp_path)
    sentinels.start()
    # Each access token lives 30 s, inside the 60 s near-expiry margin: every
    # resolve is a flight that rotates the user's refresh token.
    sandbox.provider.configure(access_token_ttl=30, rotate_refresh_tokens=True)
    c = Cluster(tmp_path, sandbox.url, redis_url=sentinels.url)
    stream = None
    try:
        c.start_worker(concurrency=3)
        for u in USERS:
            connect(c, u)
        with c.client() as client:
            stream = Stream(client, USERS)
            stream.start()
            wait_for(lambda: stream.oks_since(0) >= 20, 30, what="steady resolves through Sentinel")
            windows = []
            for kind in ROUNDS:
                began = time.monotonic()
                new_master = sentinels.failover() if kind == "failover" else sentinels.kill_master()
                wait_for(lambda: stream.oks_since(time.monotonic() - 0.5) > 0 and stream.oks_since(began) >= 10,
                         RECOVERY_SECONDS, 0.05, what=f"resolves to succeed after the {kind} to {new_master}")
                with stream.lock:
                    oks = [t for t, o in stream.events if t >= began and o == "ok"]
                    errors = [t for t, o in stream.events if t >= began and o != "ok"]
                # The error window: the longest stretch with no successful resolve.
                gap = max(b - a for a, b in zip([began, *oks], oks))
                windows.append((kind, round(gap, 2), len(errors)))
                assert gap < RECOVERY_SECONDS, windows
            stream.join()
            print(f"sentinel: outcomes {dict(stream.outcomes())}, recovery per round {windows}")
            outcomes = stream.outcomes()
            assert set(outcomes) <= {"ok", "unavailable", "timeout"}, outcomes
            # After the last failover every user still resolves.
            for u in USERS:
                client.resolve(u, "gh", timeout=10)
        refreshes = [r for r in sandbox.provider.requests("token")
                     if r.get("form", {}).get("grant_type") == "refresh_token"]
        print(f"sentinel: {len(refreshes)} refresh tokens presented, {_presented_twice(sandbox)} twice, "
              f"stats {sandbox.provider.stats()}")
        assert len(refreshes) >= 20
        assert _presented_twice(sandbox) == 0
        assert sandbox.provider.stats()["reuse_detected"] == 0
    finally:
        if stream is not None:
            stream.join()
        c.stop()
        sentinels.stop()
