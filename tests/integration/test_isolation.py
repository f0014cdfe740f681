"""A hung token endpoint cannot starve other servers (issue 10, item 3).

Before: 6 resolves against a token endpoint that accepts connections and
never answers made an unrelated user's resolve on a healthy server take 29 s,
because every worker slot sat in a hung provider call. Now a server gets at
most its share of the slots (the per-server limit), and after consecutive
transient failures its circuit opens and its calls are refused at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.clock import utcnow
from broker.errors import BrokerError
from broker.models import Credential, CredentialStatus, ObtainedVia
from sandbox.hung import HungServer
from broker.secret import Secret
from broker.servers import server_key
from tests.cluster import Cluster, sandbox_servers, wait_for, wait_for_beat_scans
from tests.integration.test_cluster import sign_in, store_of
from tests.secrets import register
from workers.common.metrics import render_cluster

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

ENV = {
    "CREDBROKER_WORKER_SLOTS": "2",  # per-server limit: half, so 1 of the 2 slots
    "CREDBROKER_BREAKER_FAILURES": "2",
    "CREDBROKER_BREAKER_COOLDOWN_SECONDS": "120",
    "CREDBROKER_REFRESH_SCAN_SECONDS": "0.5",
    # one hung call: 3 s read timeout, one retry inside the 4 s budget: about 7 s
    "CREDBROKER_HTTP_READ_TIMEOUT": "3",
    "CREDBROKER_PROVIDER_RETRY_SECONDS": "4",
}
HUNG_URL = "https://hung.upstream.test/mcp"
HUNG = server_key("hung", HUNG_URL)


def servers(sandbox_url: str, hung_url: str) -> list[dict[str, Any]]:
    hung = {"name": "hung", "url": HUNG_URL,
            "auth_broker": {"mode": "token_exchange", "token_endpoint": f"{hung_url}/token",
                            "client_id": "broker-client", "client_secret": "sandbox-client-secret-s3cr3t",
                            "audience": "hung-api"}}
    return [*sandbox_servers(sandbox_url), hung]


def status(cluster: Cluster) -> dict[str, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    out = subprocess.run([sys.executable, "-m", "workers.cli.main", "servers", "status", "--json"], cwd=ROOT,
                         env={**env, **cluster.env}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {row["name"]: row for row in json.loads(out.stdout)}


def test_hung_server_does_not_occupy_every_slot(tmp_path: Path, sandbox: Any) -> None:
    with HungServer() as hung:
        c = Cluster(tmp_path, sandbox.url, servers=servers(sandbox.url, hung.url), extra_env=ENV)
        try:
            # Several of the hung server's credentials due (the beat renews them) ...
            store = store_of(c)
            now = utcnow()
            due_users = [f"due-{i}" for i in range(4)]
            for u in due_users:
                cred = Credential(Secret(register(f"cbtest-hung-due-{u}-0123456789")), ObtainedVia.TOKEN_EXCHANGE,
                                  issued_at=now - timedelta(seconds=3000), expires_at=now + timedelta(seconds=600))
                sign_in(c, sandbox, u)
                store.put(u, HUNG, cred)
                store.touch(u, HUNG, now)
            store.engine.dispose()
            # ... and 6 users resolving it at once, as in the issue.
            callers = [f"caller-{i}" for i in range(6)]
            for u in callers + ["healthy"]:
                sign_in(c, sandbox, u)
            c.start_worker("w1", concurrency=2)
            c.start_beat()
            outcomes: dict[str, tuple[str, float]] = {}
            with c.client() as client:
                def call(u: str) -> None:
                    t0 = time.monotonic()
                    try:
                        client.resolve(u, "hung", timeout=20)
                        outcomes[u] = ("ok", time.monotonic() - t0)
                    except BrokerError as exc:
                        outcomes[u] = (exc.code, time.monotonic() - t0)

                threads = [threading.Thread(target=call, args=(u,)) for u in callers]
                for t in threads:
                    t.start()
                wait_for(lambda: hung.accepted >= 1, 10, what="a call to hang")
                t0 = time.monotonic()
                healthy = client.resolve("healthy", "tx", timeout=10)
                elapsed = time.monotonic() - t0
                print(f"healthy resolve {elapsed:.2f}s while a call hung")
                assert healthy.value.reveal().startswith("Bearer ")
                assert elapsed < 3.0, f"a healthy server's resolve took {elapsed:.1f}s"
                for t in threads:
                    t.join(30)
                print("hung-server resolves:", sorted(outcomes.values()))
                # every caller of the hung server got an answer, none waited for its timeout
                assert len(outcomes) == 6 and all(code == "upstream_error" for code, _ in outcomes.values())
                assert all(seconds < 16 for _, seconds in outcomes.values())

                # Two consecutive hung calls open the circuit, cluster-wide and visible.
                wait_for(lambda: status(c)["hung"]["circuit"] == "open", 30, 0.5, what="the circuit to open")
                row = status(c)["hung"]
                assert row["consecutive_failures"] >= 2 and row["open_seconds_left"] > 60
                assert status(c)["tx"]["circuit"] == "closed"
                assert 'credbroker_server_circuit_state{server="hung"} 1' in render_cluster(c.redis)
                # Open: refused without a call, and a due user is served its still-valid credential.
                accepted = hung.accepted
                t0 = time.monotonic()
                stale = client.resolve("due-0", "hung", timeout=10)
                assert time.monotonic() - t0 < 2.0
                assert stale.value.reveal() == "Bearer cbtest-hung-due-due-0-0123456789"
                wait_for_beat_scans(c.redis, 3)  # three scans with the hung server's credentials due
                assert hung.accepted == accepted, "a call reached a server whose circuit is open"
                # the limit held: calls reached the hung server one at a time, so
                # only the two that opened the circuit (each tried twice) got through
                print(f"connections to the hung server: {hung.accepted}")
                assert hung.accepted <= 6
                again = time.monotonic()
                client.resolve("healthy", "tx", timeout=10)
                assert time.monotonic() - again < 1.0
            s = store_of(c)
            rows = [s.get(u, HUNG) for u in due_users]
            s.engine.dispose()
            assert all(r is not None and r.status is not CredentialStatus.NEEDS_RECONNECT for r in rows)
        finally:
            c.stop()
