"""Chaos: rotating users with short lifetimes, two workers and the beat, while the
test SIGKILLs and SIGSTOPs workers, deletes claim keys and restarts a private
Redis (no persistence: every key, queued task and result is lost).

At the provider, no refresh token may be presented twice except where a flight
was killed holding the row's lease (its response provably lost); each such user
must be reported ``rotation_lost`` in the store, never silently, and every other
user must still resolve at the end.

CI runs 40 users for 25 s; the full run:
``CREDBROKER_CHAOS_USERS=200 CREDBROKER_CHAOS_SECONDS=120 python -m pytest -s tests/integration/test_chaos.py``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from broker.db import audit_events, credentials
from broker.errors import BrokerError, NotConnected
from broker.lease import ROTATION_LOST
from broker.models import CredentialStatus
from broker.servers import server_key
from tests.cluster import Cluster, wait_for
from tests.faults import PrivateRedis
from tests.integration.test_cluster import store_of
from workers.constants import FLIGHT_PREFIX
from workers.metrics import CLUSTER_HASH

USERS = int(os.environ.get("CREDBROKER_CHAOS_USERS", "40"))
SECONDS = float(os.environ.get("CREDBROKER_CHAOS_SECONDS", "25"))
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(int(180 + SECONDS * 2 + USERS))]
GH_KEY = server_key("gh", "https://gh.upstream.test/mcp")
# Lease = (0.5 s connect + 2 s read) x 1 attempt + 0 retry budget + 3 s margin = 5.5 s:
# longer than any pause this test makes, so only a kill can lose a response.
ENV = {
    "CREDBROKER_NEAR_EXPIRY_SECONDS": "1", "CREDBROKER_REFRESH_FRACTION": "0.5",
    "CREDBROKER_REFRESH_SCAN_SECONDS": "1", "CREDBROKER_REFRESH_JITTER_SECONDS": "0.5",
    "CREDBROKER_HTTP_CONNECT_TIMEOUT": "0.5", "CREDBROKER_HTTP_READ_TIMEOUT": "2",
    "CREDBROKER_PROVIDER_MAX_ATTEMPTS": "1", "CREDBROKER_PROVIDER_RETRY_SECONDS": "0",
    "CREDBROKER_LEASE_MARGIN_SECONDS": "3", "CREDBROKER_RESOLVE_TIMEOUT": "8", "CREDBROKER_TASK_TIME_LIMIT": "20",
}


def connect_all(c: Cluster, users: list[str]) -> None:
    from workers.runtime import build_runtime

    rt = build_runtime(c.settings)
    try:
        with httpx.Client() as http:
            for user in users:
                # Browser mode: open the link (binds the browser), consent, callback, the confirming click.
                flow = rt.connect
                assert flow is not None
                opened = flow.open(parse_qs(urlsplit(flow.start(user, "gh").connect_url).query)["state"][0])
                answer = http.get(opened.authorize_url + "&consent=approve&user=" + user, follow_redirects=False)
                q = parse_qs(urlsplit(answer.headers["location"]).query)
                flow.callback(q["state"][0], q["code"][0], cookie=opened.cookie_value)
                flow.confirm(q["state"][0], opened.cookie_value)
    finally:
        rt.close()


def leased_users(c: Cluster) -> set[str]:
    store = store_of(c)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(select(credentials.c.user_id).where(credentials.c.lease_owner.is_not(None))).all()
        return {r.user_id for r in rows}
    finally:
        store.engine.dispose()


def _rotation_lost_metric(c: Cluster) -> int:
    try:
        raw = c.redis.hgetall(CLUSTER_HASH)
    except Exception:  # noqa: BLE001 - Redis restarting
        return 0
    return sum(int(v) for k, v in raw.items() if k.startswith(b"credbroker_rotation_lost_total"))


def _signal_group(proc: Any, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def test_chaos_presents_no_refresh_token_twice_unless_a_kill_lost_it(tmp_path: Path, sandbox: Any) -> None:
    sandbox.provider.configure(access_token_ttl=4, rotate_refresh_tokens=True, refresh_reuse_grace=0)
    private = PrivateRedis(tmp_path)
    private.start()
    c = Cluster(tmp_path, sandbox.url, redis_url=private.url, extra_env=ENV)
    rng = random.Random(11)
    users = [f"chaos-{i:03d}" for i in range(USERS)]
    actions: Counter[str] = Counter()
    possibly_lost: set[str] = set()
    stop_load = threading.Event()
    load: Counter[str] = Counter()
    metric_lost = 0
    try:
        workers = ["w1", "w2"]
        for w in workers:
            c.start_worker(w, concurrency=2)
        c.start_beat()
        connect_all(c, users)
        sandbox.provider.set_latency("token", 150)  # kills land mid-call, sometimes

        def resolve_loop(seed: int) -> None:
            r = random.Random(seed)
            with c.client() as client:
                while not stop_load.is_set():
                    try:
                        client.resolve(r.choice(users), "gh", timeout=3)
                        load["ok"] += 1
                    except BrokerError as exc:
                        load[exc.code] += 1
                    except Exception as exc:  # noqa: BLE001 - Redis gone mid-call, etc.
                        load[type(exc).__name__] += 1
                        stop_load.wait(0.2)

        loaders = [threading.Thread(target=resolve_loop, args=(i,), daemon=True) for i in range(3)]
        for t in loaders:
            t.start()

        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            stop_load.wait(rng.uniform(1.0, 2.0))
            action = rng.choices(["kill", "stop", "claims", "redis"], weights=[3, 3, 3, 1])[0]
            actions[action] += 1
            if action == "kill":
                name = rng.choice(workers)
                _signal_group(c.procs[name], signal.SIGKILL)
                c.procs[name].wait(10)
                # Every lease held now: the killed flights' (never released) and, as a
                # superset, whatever the other worker has in flight.
                possibly_lost |= leased_users(c)
                c.start_worker(name, concurrency=2)
            elif action == "stop":
                proc = c.procs[rng.choice(workers)]
                _signal_group(proc, signal.SIGSTOP)
                stop_load.wait(rng.uniform(0.3, 1.0))
                _signal_group(proc, signal.SIGCONT)
            elif action == "claims":
                keys = list(c.redis.scan_iter(FLIGHT_PREFIX + "*"))
                if keys:
                    c.redis.delete(*keys)
            else:
                metric_lost += _rotation_lost_metric(c)  # the restart wipes the metrics hash
                private.kill()
                private.start()
        stop_load.set()
        for t in loaders:
            t.join(15)
        sandbox.provider.set_latency("token", 0)
        for w in workers:  # all running again
            _signal_group(c.procs[w], signal.SIGCONT)

        # -- the end state ------------------------------------------------------------
        def final(user: str) -> str:
            deadline = time.monotonic() + 40
            with c.client() as client:
                while True:
                    try:
                        client.resolve(user, "gh", timeout=8)
                        return "ok"
                    except NotConnected:
                        return "not_connected"
                    except Exception:  # noqa: BLE001 - a lease still running out, a worker restarting
                        if time.monotonic() > deadline:
                            return "failed"
                        time.sleep(0.5)

        with ThreadPoolExecutor(8) as pool:
            outcome = dict(zip(users, pool.map(final, users)))
        stats = sandbox.provider.stats()
        store = store_of(c)
        try:
            rows = {u: store.get(u, GH_KEY) for u in users}
            with store.engine.connect() as conn:
                audited = conn.execute(select(audit_events.c.user_id)
                                       .where(audit_events.c.reason == ROTATION_LOST)).all()
        finally:
            store.engine.dispose()
        metric_lost += _rotation_lost_metric(c)
    finally:
        stop_load.set()
        c.stop()
        private.stop()

    lost = {u for u, r in rows.items()
            if r is not None and r.status is CredentialStatus.NEEDS_RECONNECT and r.failure == ROTATION_LOST}
    twice = set(stats["presented_twice_by_user"])
    figures = {
        "users": USERS, "seconds": SECONDS, "actions": dict(actions), "load": dict(load),
        "refresh_grants": stats["grants"]["refresh_token"], "presentations": stats["refresh_presentations"],
        "presented_twice": stats["refresh_presented_twice"], "users_presented_twice": len(twice),
        "possibly_lost_by_kills": len(possibly_lost), "rotation_lost": len(lost),
        "rotation_lost_audited": len({a.user_id for a in audited}), "rotation_lost_metric": metric_lost,
        "final": dict(Counter(outcome.values())),
    }
    print("\nchaos:", figures)
    # A second presentation only where a kill took a flight holding the lease, and
    # each one reported as rotation_lost in the store, never silently.
    assert twice <= possibly_lost, (twice - possibly_lost, figures)
    assert twice <= lost, (twice - lost, figures)
    assert lost <= possibly_lost, figures
    # Counted on /metrics (summed across restarts). The count lives in Redis: one
    # landing while Redis restarts is lost with it (the store and audit keep it).
    assert metric_lost <= len(lost), figures
    assert metric_lost == len(lost) or actions["redis"], figures
    # Every other user still resolves; the lost ones answer not_connected.
    assert all(outcome[u] == "ok" for u in users if u not in lost), (
        {u: (outcome[u], rows[u] and rows[u].failure) for u in users if u not in lost and outcome[u] != "ok"},
        figures)
    assert all(outcome[u] == "not_connected" for u in lost), figures
    assert actions["kill"] and actions["stop"] and actions["claims"], figures
