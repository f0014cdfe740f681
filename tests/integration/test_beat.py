"""Proactive refresh with beat: rotating refresh tokens, the fast path under
steady load, two beats by mistake, the indexed due scan on PostgreSQL, and no
secret anywhere in Redis (SCAN and MONITOR), worker logs or Flower."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import insert, text

from broker.db import credentials as T
from broker.db import make_engine
from broker.models import CredentialStatus
from broker.servers import server_key
from broker.store import CredentialStore
from tests.cluster import Cluster, read_all_redis, wait_for
from tests.integration.test_cluster import connect, sign_in, store_of
from tests.secrets import all_canaries, find_leaks, register
from workers.common.metrics import METRICS

pytestmark = pytest.mark.integration

FAST_ENV = {
    # 5-second credentials: refresh point at 60% (3 s), cached until 0.5 s before expiry.
    "CREDBROKER_NEAR_EXPIRY_SECONDS": "0.5",
    "CREDBROKER_REFRESH_FRACTION": "0.6",
    "CREDBROKER_REFRESH_SCAN_SECONDS": "0.5",
    "CREDBROKER_REFRESH_JITTER_SECONDS": "0.2",
}
LIFETIME = 5


class Monitor(threading.Thread):
    """Captures every command Redis executes (MONITOR) until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.pool = redis.ConnectionPool.from_url(url)
        self.lines: list[str] = []
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with redis.Redis(connection_pool=self.pool).monitor() as m:
            self.ready.set()
            conn = m.connection
            while not self.stopping.is_set():
                if conn.can_read(timeout=0.2):
                    self.lines.append(repr(m.next_command()))

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.pool.disconnect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rotation_fast_path_two_beats_and_no_secret_in_redis(tmp_path: Path, sandbox: Any, pg_url: str) -> None:
    sandbox.provider.configure(access_token_ttl=LIFETIME, rotate_refresh_tokens=True)
    c = Cluster(tmp_path, sandbox.url, database_url=pg_url, extra_env=FAST_ENV)
    monitor = Monitor(c.redis_url.rsplit("/", 1)[0] + "/0")
    monitor.start()
    monitor.ready.wait(5)
    flower_port = _free_port()
    try:
        c.start_worker("w1", concurrency=2)
        c.start_worker("w2", concurrency=2)
        users = [f"user-{i:02d}" for i in range(50)]
        for u in users:
            sign_in(c, sandbox, u)
        connect(c, "rita")
        c.start_beat("beat1")
        c.start_beat("beat2")  # by mistake: must not double the refreshes
        c._spawn("flower", ["-m", "celery", "-A", "workers.celery.app", "flower", f"--port={flower_port}",
                            "--address=127.0.0.1", "--basic-auth=ops:flower-pass-123"])
        seen: dict[str, set[str]] = {u: set() for u in users + ["rita"]}
        errors: list[str] = []
        with c.client() as client:
            for u in users:  # warm-up: one flight each
                seen[u].add(client.resolve(u, "tx", timeout=20).value.reveal())
            seen["rita"].add(client.resolve("rita", "gh", timeout=20).value.reveal())
            flights_before = METRICS.value("credbroker_resolves_total", outcome="ok", path="flight")
            started = time.monotonic()

            def done() -> bool:
                # at least 3 credential lifetimes and 5 refresh cycles of rita's rotating token
                rita_refreshes = sandbox.provider.stats()["by_user"].get("rita", {}).get("refresh_token", 0)
                return time.monotonic() - started > 3 * LIFETIME + 1.5 and rita_refreshes >= 5 \
                    or time.monotonic() - started > 45

            def steady(batch: list[str], server: str) -> None:
                while not done():
                    for u in batch:
                        try:
                            seen[u].add(client.resolve(u, server, timeout=20).value.reveal())
                        except Exception as exc:  # noqa: BLE001
                            errors.append(getattr(exc, "code", type(exc).__name__))
                    time.sleep(0.02)
            threads = [threading.Thread(target=steady, args=(users[i::4], "tx")) for i in range(4)]
            threads.append(threading.Thread(target=steady, args=(["rita"], "gh")))
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a caller thread hung"
            flights_after = METRICS.value("credbroker_resolves_total", outcome="ok", path="flight")
            during_run = read_all_redis(c.redis)
        for tokens in seen.values():
            for tok in tokens:
                register(tok.removeprefix("Bearer "))
        stats = sandbox.provider.stats()
        for req in sandbox.provider.requests("token"):
            for field in ("subject_token", "refresh_token"):
                if isinstance(req.get("form", {}).get(field), str):
                    register(req["form"][field])
        store = store_of(c)
        rita = store.get("rita", server_key("gh", "https://gh.upstream.test/mcp"))
        assert rita is not None
        register(rita.credential.access_token.reveal())
        if rita.credential.refresh_token:
            register(rita.credential.refresh_token.reveal())
        store.engine.dispose()

        assert errors == []
        # no caller waited on the provider after warm-up
        assert flights_after == flights_before
        # rotating refresh tokens: >= 3 cycles in 3 lifetimes, no reuse, no invalid_grant
        refreshes = stats["by_user"].get("rita", {}).get("refresh_token", 0)
        assert refreshes >= 5
        # Every refresh's token was served, except those the beat made after the
        # callers stopped (it keeps running until the stats are read): at most two.
        assert 0 <= refreshes - (len(seen["rita"]) - 1) <= 2
        assert stats["reuse_detected"] == 0
        assert stats["errors"].get("invalid_grant", 0) == 0
        assert rita.status is CredentialStatus.CONNECTED
        # two beats, no doubling: at most one renewal per refresh window per user
        elapsed = time.monotonic() - started
        max_per_user = 1 + int(elapsed / (LIFETIME * 0.6)) + 1
        for u in users:
            n = stats["by_user"][u].get("token_exchange", 0)
            assert 3 <= n <= max_per_user, (u, n)
        # audit left the request path through the stream and reached SQL via the workers
        from broker.audit import SqlAuditLog

        engine = make_engine(pg_url)
        audit = SqlAuditLog(engine)
        wait_for(lambda: any(e["action"] == "refresh" and e["outcome"] == "success"
                             for e in audit.query(user_id="rita", limit=1000)), 15, 0.2, what="refresh audit rows")
        injects = [e for e in audit.query(user_id="user-00", limit=1000) if e["action"] == "inject"]
        assert injects and all(e["outcome"] == "success" and e["method"] == "token_exchange" for e in injects)
        audit_rows = repr(audit.query(limit=10000))
        engine.dispose()
        # Flower requires auth and shows no secret
        wait_for(lambda: _flower_up(flower_port), 30, 0.2, what="flower")
        assert httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks").status_code == 401
        pages = [httpx.get(f"http://127.0.0.1:{flower_port}{path}", auth=("ops", "flower-pass-123"), timeout=10)
                 for path in ("/api/tasks", "/tasks", "/api/workers")]
        assert all(p.status_code == 200 for p in pages)
        assert "broker.resolve" in pages[0].text or "broker.refresh" in pages[0].text
        flower_text = "\n".join(p.text for p in pages)
    finally:
        monitor.stop()
        c.stop()
    assert len(all_canaries()) > 100
    assert find_leaks(during_run) == [], "a token was readable in Redis during the run"
    assert find_leaks(read_all_redis(redis.Redis.from_url(c.redis_url))) == [], "a token was readable in Redis after the run"
    assert len(monitor.lines) > 1000
    assert find_leaks("\n".join(monitor.lines)) == [], "a token crossed the wire to Redis in plaintext"
    assert find_leaks(c.all_logs()) == [], "a token appeared in worker, beat or flower logs"
    assert find_leaks(flower_text) == [], "a token appeared in Flower"
    assert find_leaks(audit_rows) == [], "a token appeared in an audit row"


def _flower_up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_due_query_uses_the_index_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)
    now = datetime(2026, 6, 1, tzinfo=UTC)
    rows = [
        {"user_id": f"u{i}", "server_key": "k" * 64, "ciphertext": b"x", "key_id": "A", "status": "connected",
         "obtained_via": "token_exchange", "token_type": "Bearer", "scopes": "[]",
         "expires_at": now + timedelta(seconds=i), "refresh_at": now + timedelta(seconds=i - 600),
         "last_used_at": now, "created_at": now, "updated_at": now, "version": 1}
        for i in range(20000)
    ]
    with engine.begin() as conn:
        conn.execute(insert(T), rows)
        conn.execute(text("ANALYZE credentials"))
    store = CredentialStore(engine, None)
    stmt = store.due_statement(now, now - timedelta(hours=1), limit=10000)
    compiled = stmt.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + str(compiled))))
    assert "ix_credentials_refresh_at" in plan, plan
    del store
    engine.dispose()
