"""The caller's deadline holds whatever Redis does: a black-holed Redis (a
private redis-server stopped with SIGSTOP: the kernel still accepts
connections, nothing answers) makes ``resolve(timeout=3)`` fail with
``unavailable`` or ``timeout`` within 3.5 s, for a client whose connections
were open before the stall and for one that connects during it, and the API
answers 503/504 within the deadline without pinning a thread."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.errors import BrokerError
from tests.cluster import Cluster, wait_for
from tests.faults import PrivateRedis
from tests.integration.test_cluster import sign_in
from tests.secrets import register

pytestmark = pytest.mark.integration

DEADLINE = 3.0
SLACK = 0.5


class Stalled:
    """A private Redis and a cluster on it; ``stall()`` black-holes Redis."""

    def __init__(self, redis: PrivateRedis, cluster: Cluster) -> None:
        self.redis = redis
        self.cluster = cluster
        self.stopped = False

    def stall(self) -> None:
        assert self.redis.proc is not None
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def unstall(self) -> None:
        if self.stopped and self.redis.proc is not None:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
            self.stopped = False


@pytest.fixture
def stalled(tmp_path: Path, sandbox: Any) -> Iterator[Stalled]:
    private = PrivateRedis(tmp_path)
    private.start()
    cluster = Cluster(tmp_path, sandbox.url, redis_url=private.url)
    s = Stalled(private, cluster)
    try:
        cluster.start_worker()
        yield s
    finally:
        s.unstall()
        cluster.stop()
        private.stop()


def _timed_failure(call: Any) -> tuple[float, str]:
    started = time.monotonic()
    try:
        call()
    except BrokerError as exc:
        took, code = time.monotonic() - started, exc.code
    else:
        took, code = time.monotonic() - started, "ok"
    print(f"deadline: {code} after {took:.2f}s")  # figures for the report (pytest -s)
    return took, code


def test_resolve_deadline_holds_when_redis_black_holed(stalled: Stalled, sandbox: Any) -> None:
    c = stalled.cluster
    for u in ("warm", "cold-a", "cold-b"):
        sign_in(c, sandbox, u)
    warm = c.client()
    try:
        warm.resolve("warm", "tx", timeout=10)  # opens the Redis pool, the producer, the result listener
        stalled.stall()
        # A flight (no cached copy) and the fast path (cached copy) on the warm client.
        took, code = _timed_failure(lambda: warm.resolve("cold-a", "tx", timeout=DEADLINE))
        assert code in ("unavailable", "timeout") and took < DEADLINE + SLACK, (code, took)
        took, code = _timed_failure(lambda: warm.resolve("warm", "tx", timeout=DEADLINE))
        assert code in ("unavailable", "timeout") and took < DEADLINE + SLACK, (code, took)
        # A client built during the stall: every connection it opens hangs after accept.
        cold = c.client()
        try:
            took, code = _timed_failure(lambda: cold.resolve("cold-b", "tx", timeout=DEADLINE))
            assert code in ("unavailable", "timeout") and took < DEADLINE + SLACK, (code, took)
            # Several at once, as a gateway would send them.
            results: list[tuple[float, str]] = []
            threads = [threading.Thread(target=lambda u=u: results.append(
                _timed_failure(lambda: cold.resolve(u, "tx", timeout=DEADLINE)))) for u in ("cold-a", "warm")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLINE + 5)
            assert len(results) == 2
            assert all(code in ("unavailable", "timeout") and took < DEADLINE + SLACK for took, code in results), results
            stalled.unstall()
            # Redis back: the same clients recover on their own.
            wait_for(lambda: _timed_failure(lambda: cold.resolve("cold-b", "tx", timeout=5))[1] == "ok", 30,
                     0.2, what="the cold client to recover")
            wait_for(lambda: _timed_failure(lambda: warm.resolve("cold-a", "tx", timeout=5))[1] == "ok", 30,
                     0.2, what="the warm client to recover")
        finally:
            cold.close()
    finally:
        stalled.unstall()
        warm.close()


def test_api_resolve_deadline_holds_when_redis_black_holed(stalled: Stalled, sandbox: Any) -> None:
    from tests.integration.test_api import Api, Served
    from workers.api.app import create_app
    from broker.settings import load_settings

    key = register("cbtest-apikey-" + secrets.token_hex(12))
    c = stalled.cluster
    settings = load_settings({**c.env, "CREDBROKER_API_KEYS": key}, env_file=None)
    sign_in(c, sandbox, "api-warm")
    sign_in(c, sandbox, "api-cold")
    served = Served(create_app(settings))
    api = Api(served.url, key=key)
    try:
        assert api.resolve("api-warm", "tx", timeout=10).status_code == 200
        baseline = threading.active_count()
        stalled.stall()
        for user in ("api-cold", "api-warm"):
            started = time.monotonic()
            r = api.resolve(user, "tx", timeout=DEADLINE)
            took = time.monotonic() - started
            assert r.status_code in (503, 504) and took < DEADLINE + SLACK, (r.status_code, r.text, took)
        # No request thread stays pinned on the stalled Redis.
        wait_for(lambda: threading.active_count() <= baseline + 2, 10, what="API threads to be released")
        stalled.unstall()
        wait_for(lambda: api.resolve("api-cold", "tx", timeout=5).status_code == 200, 30, 0.2,
                 what="the API to recover")
    finally:
        stalled.unstall()
        api.close()
        served.stop()
