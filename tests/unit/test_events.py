"""Connection lifecycle events: the transition table, the outbox written with
the status change (SQLite and PostgreSQL), exactly once under concurrent
writers, the expiry scan and the consumer cursor."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from broker import events as ev
from broker.clock import FakeClock
from broker.events import EventLog, announce_expired, transition
from broker.models import Credential, CredentialStatus, ObtainedVia
from broker.secret import Secret
from broker.store import CredentialStore
from tests.conftest import make_keyring
from tests.secrets import canary

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def cred(ttl: int = 3600, via: ObtainedVia = ObtainedVia.CONNECT_FLOW, issued: datetime = NOW) -> Credential:
    return Credential(access_token=Secret(canary("at")), refresh_token=Secret(canary("rt")), obtained_via=via,
                      token_type="Bearer", issued_at=issued, expires_at=issued + timedelta(seconds=ttl))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def store(engine, clock) -> CredentialStore:  # type: ignore[no-untyped-def]
    return CredentialStore(engine, make_keyring("A"), clock=clock)


def types(store: CredentialStore) -> list[tuple[str, str, str, str | None]]:
    return [(e.type, e.user_id, e.status, e.reason) for e in EventLog(store.engine).after(0, 1000)]


def test_transition_table() -> None:
    C, D, N = "connected", "degraded", "needs_reconnect"
    assert transition(None, C) == ev.CONNECTED
    assert transition(C, C) is None
    assert transition(C, D) == ev.DEGRADED
    assert transition(D, D) is None
    assert transition(D, C) == ev.RECOVERED
    assert transition("expired", C) == ev.RECOVERED
    assert transition(D, N) == ev.NEEDS_RECONNECT
    assert transition(N, C) == ev.CONNECTED  # the user reconnected
    assert transition(C, N) == ev.NEEDS_RECONNECT


def test_one_event_per_change_not_per_write(store: CredentialStore, clock: FakeClock) -> None:
    s = store.put("alice", "k", cred())
    for _ in range(3):  # refreshes that change nothing a gateway cares about
        s = store.compare_and_swap("alice", "k", s.version, cred())  # type: ignore[assignment]
    assert store.set_status("alice", "k", CredentialStatus.DEGRADED, expected_version=s.version, failure="http_502")
    s = store.get("alice", "k")  # type: ignore[assignment]
    assert store.set_status("alice", "k", CredentialStatus.DEGRADED, expected_version=s.version, failure="http_502")
    s = store.get("alice", "k")  # type: ignore[assignment]
    s = store.compare_and_swap("alice", "k", s.version, cred())  # type: ignore[assignment]
    s = store.get("alice", "k")  # type: ignore[assignment]
    store.set_status("alice", "k", CredentialStatus.NEEDS_RECONNECT, expected_version=s.version,
                     failure="invalid_grant")
    store.put("alice", "k", cred())
    assert store.delete("alice", "k")
    assert not store.delete("alice", "k")
    assert types(store) == [
        (ev.CONNECTED, "alice", "connected", None),
        (ev.DEGRADED, "alice", "degraded", "http_502"),
        (ev.RECOVERED, "alice", "connected", None),
        (ev.NEEDS_RECONNECT, "alice", "needs_reconnect", "invalid_grant"),
        (ev.CONNECTED, "alice", "connected", None),
        (ev.DISCONNECTED, "alice", "not_connected", "deleted"),
    ]


def test_a_write_that_loses_the_fence_emits_nothing(store: CredentialStore) -> None:
    s = store.put("bob", "k", cred())
    assert store.compare_and_swap("bob", "k", s.version + 5, cred()) is None
    assert not store.set_status("bob", "k", CredentialStatus.DEGRADED, expected_version=s.version + 5)
    assert store.compare_and_swap("bob", "k", None, cred()) is None  # insert race lost
    assert [t for t, *_ in types(store)] == [ev.CONNECTED]


def test_concurrent_writers_emit_each_change_once(store: CredentialStore) -> None:
    """Eight threads race to mark the same credential degraded, then to heal it:
    exactly one degraded and one recovered event."""
    s = store.put("carol", "k", cred())
    barrier = threading.Barrier(8)

    def degrade() -> None:
        barrier.wait()
        store.set_status("carol", "k", CredentialStatus.DEGRADED, failure="http_503")

    threads = [threading.Thread(target=degrade) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    current = store.get("carol", "k")
    assert current is not None

    def heal() -> None:
        barrier.wait()
        store.put("carol", "k", cred())

    threads = [threading.Thread(target=heal) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [t for t, *_ in types(store)] == [ev.CONNECTED, ev.DEGRADED, ev.RECOVERED]
    assert s.version >= 1


def test_expiry_scan_announces_once_and_renewal_recovers(store: CredentialStore, clock: FakeClock) -> None:
    store.put("dave", "k", cred(ttl=60))
    store.put("erin", "k", cred(ttl=600))
    store.put("tx-user", "k", cred(ttl=60, via=ObtainedVia.TOKEN_EXCHANGE))  # re-minted on use: no event
    assert announce_expired(store.engine, NOW) == 0
    clock.advance(120)
    assert announce_expired(store.engine, clock.now()) == 1
    assert announce_expired(store.engine, clock.now()) == 0
    clock.advance(1)
    assert announce_expired(store.engine, clock.now()) == 0  # the cursor moved past dave
    s = store.get("dave", "k")
    assert s is not None
    store.compare_and_swap("dave", "k", s.version, cred(issued=clock.now()))
    got = types(store)
    assert [(t, u) for t, u, *_ in got] == [(ev.CONNECTED, "dave"), (ev.CONNECTED, "erin"), (ev.CONNECTED, "tx-user"),
                                            (ev.EXPIRED, "dave"), (ev.RECOVERED, "dave")]
    assert got[3][2:] == ("expired", "expires_at_passed")


def test_cursor_and_consumer_batches(store: CredentialStore) -> None:
    for i in range(5):
        store.put(f"u{i}", "k", cred())
    log = EventLog(store.engine, server_name={"k": "github"}.get)
    first = log.after(0, limit=2)
    assert [e.user_id for e in first] == ["u0", "u1"] and first[0].server == "github"
    assert [e.user_id for e in log.after(first[-1].id, limit=10)] == ["u2", "u3", "u4"]
    assert log.after(0, user_id="u3")[0].user_id == "u3"
    seen: list[int] = []
    assert log.claim_batch("hooks", 3, lambda e: seen.append(e.id)) == 3
    assert log.claim_batch("hooks", 3, lambda e: seen.append(e.id)) == 2
    assert log.claim_batch("hooks", 3, lambda e: seen.append(e.id)) == 0
    assert seen == sorted(set(seen)) and len(seen) == 5

    def boom(e: object) -> None:
        raise RuntimeError("queue down")

    store.put("u9", "k", cred())
    with pytest.raises(RuntimeError):
        log.claim_batch("hooks", 3, boom)
    assert log.claim_batch("hooks", 3, lambda e: seen.append(e.id)) == 1  # not lost
    d = log.after(0, 1)[0].to_dict()
    assert set(d) == {"id", "type", "user_id", "server", "status", "reason", "at"}


def test_forget_user_after_erasure(store: CredentialStore) -> None:
    store.put("gina", "k", cred())
    store.put("hal", "k", cred())
    store.delete("gina", "k")
    assert ev.forget_user(store.engine, "gina", "erased:abc") == 2
    assert [u for _, u, *_ in types(store)] == ["erased:abc", "hal", "erased:abc"]
