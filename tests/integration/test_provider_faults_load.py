"""Every sandbox fault mode under concurrent load through the cluster, and a
provider whose clock is skewed. Affected calls fail with a clear upstream
error, nothing else breaks, nothing secret leaks, and service resumes."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker.errors import UpstreamError
from tests.cluster import Cluster
from tests.integration.test_cluster import sign_in, store_of
from tests.secrets import find_leaks, register

pytestmark = pytest.mark.integration

MODES = ["5xx", "429", "hang", "malformed", "no_access_token", "huge", "echo_secret"]


def _resolve_all(client: Any, users: list[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    lock = threading.Lock()

    def one(u: str) -> None:
        try:
            r = client.resolve(u, "tx", timeout=20)
            register(r.value.reveal().removeprefix("Bearer "))
            key = "ok"
        except UpstreamError as exc:
            key = f"upstream:{exc.status}:{exc.oauth_error}"
        except Exception as exc:  # noqa: BLE001
            key = getattr(exc, "code", type(exc).__name__)
        with lock:
            out[key] += 1

    threads = [threading.Thread(target=one, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a caller thread hung"
    return out


def test_fault_modes_under_load(tmp_path: Path, sandbox: Any) -> None:
    c = Cluster(tmp_path, sandbox.url, extra_env={"CREDBROKER_HTTP_READ_TIMEOUT": "1",
                                                  "CREDBROKER_PROVIDER_RETRY_SECONDS": "3"})
    register("sandbox-client-secret-s3cr3t")
    report: dict[str, Counter[str]] = {}
    try:
        c.start_worker("w1", concurrency=4)
        with c.client() as client:
            for mode in MODES:
                users = [f"{mode}-{i}" for i in range(8)]
                for u in users:
                    sign_in(c, sandbox, u)
                # the first 3 calls meet the fault; retryable faults then succeed
                sandbox.provider.set_fault("token", mode, count=3, retry_after=1, hang_seconds=3)
                report[mode] = outcome = _resolve_all(client, users)
                assert sum(outcome.values()) == len(users)
                if mode in ("5xx", "429", "hang"):
                    assert outcome["ok"] >= len(users) - 3, (mode, outcome)
                else:
                    assert outcome["ok"] == len(users) - 3, (mode, outcome)
                assert set(outcome) <= {"ok", "upstream:None:None", "upstream:200:None", "upstream:400:invalid_request",
                                        "upstream:503:None", "upstream:429:None"}, (mode, outcome)
                sandbox.provider.set_fault("token", None)
                again = _resolve_all(client, users)
                assert again == Counter(ok=len(users)), (mode, again)
        store = store_of(c)
        for mode in MODES:
            for i in range(8):
                recs = store.list(f"{mode}-{i}")
                assert len(recs) == 1  # nothing half-stored by a failure
        store.engine.dispose()
    finally:
        c.stop()
    assert find_leaks(c.all_logs()) == [], "a secret reached the worker log"


def test_skewed_provider_clock(tmp_path: Path, sandbox: Any) -> None:
    # The provider's clock runs two hours behind: every JWT's exp is already in the
    # past on arrival. The broker trusts the relative expires_in, so it works normally
    # and does not re-mint on every call.
    sandbox.provider.configure(clock_skew=-7200)
    c = Cluster(tmp_path, sandbox.url)
    try:
        c.start_worker()
        sign_in(c, sandbox, "sam")
        with c.client() as client:
            first = client.resolve("sam", "tx", timeout=20)
            for _ in range(20):
                assert client.resolve("sam", "tx", timeout=20).value == first.value
        assert sandbox.provider.stats()["grants"]["token_exchange"] == 1
    finally:
        c.stop()
