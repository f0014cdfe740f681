"""The beat's scans on SQLite and PostgreSQL: fair per server, backoff
excluded, keep-alive by index, and what a failure or a new subject token does
to a row's schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert

from broker.clock import FakeClock
from broker.db import credentials as T
from broker.models import Credential, CredentialStatus, ObtainedVia, SubjectToken
from broker.secret import Secret
from broker.store import UNTIL_SUBJECT_CHANGES, CredentialStore
from tests.conftest import make_keyring
from tests.secrets import canary

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
HOUR_AGO = NOW - timedelta(hours=1)
BAD, GOOD, QUIET = "b" * 64, "g" * 64, "q" * 64


@pytest.fixture
def store(engine) -> CredentialStore:  # type: ignore[no-untyped-def]
    return CredentialStore(engine, make_keyring("A"), clock=FakeClock(NOW), idle_seconds={GOOD: 500.0}.get)


def _rows(server_key: str, n: int, refresh_at: datetime, **extra: object) -> list[dict[str, object]]:
    return [{"user_id": f"{server_key[0]}{i:05d}", "server_key": server_key, "ciphertext": b"x", "key_id": "A",
             "status": "connected", "obtained_via": "connect_flow", "token_type": "Bearer", "scopes": "[]",
             "expires_at": NOW + timedelta(hours=1), "refresh_at": refresh_at + timedelta(milliseconds=i),
             "last_used_at": NOW, "created_at": NOW, "updated_at": NOW, "version": 1, **extra}
            for i in range(n)]


def test_a_failing_servers_backlog_does_not_hide_healthy_servers(store: CredentialStore) -> None:
    with store.engine.begin() as conn:
        # 2,000 due rows of a failing server, all older than the healthy ones
        conn.execute(insert(T), _rows(BAD, 2000, NOW - timedelta(minutes=50)))
        conn.execute(insert(T), _rows(GOOD, 3, NOW - timedelta(minutes=1)))
    old = store.due(NOW, HOUR_AGO, limit=1000)  # the unfair scan: oldest first
    assert {k for _, k in old} == {BAD}
    fair = store.due(NOW, HOUR_AGO, limit=1000, server_keys=[BAD, GOOD, QUIET])
    assert len(fair) == 1000
    assert [p for p in fair if p[1] == GOOD] == [("g00000", GOOD), ("g00001", GOOD), ("g00002", GOOD)]
    assert fair[:6:2] == [("b00000", BAD), ("b00001", BAD), ("b00002", BAD)]  # interleaved
    assert fair[1:6:2] == [("g00000", GOOD), ("g00001", GOOD), ("g00002", GOOD)]
    assert len(set(fair)) == 1000
    # the failing rows in backoff: out of the scan entirely
    with store.engine.begin() as conn:
        conn.execute(T.update().where(T.c.server_key == BAD).values(next_attempt_at=NOW + timedelta(minutes=5)))
    assert store.due(NOW, HOUR_AGO, limit=1000, server_keys=[BAD, GOOD]) == [
        ("g00000", GOOD), ("g00001", GOOD), ("g00002", GOOD)]
    assert store.due(NOW + timedelta(minutes=5), HOUR_AGO, limit=10, server_keys=[BAD])[0] == ("b00000", BAD)


def cred(ttl: int = 3600, via: ObtainedVia = ObtainedVia.CONNECT_FLOW) -> Credential:
    return Credential(access_token=Secret(canary("at")), refresh_token=Secret(canary("rt")), obtained_via=via,
                      issued_at=NOW, expires_at=NOW + timedelta(seconds=ttl))


def test_record_failure_moves_the_schedule_and_success_resets_it(store: CredentialStore) -> None:
    written = store.put("alice", GOOD, cred(ttl=100))  # refresh point NOW+40 s, keep-alive NOW+400 s
    store.touch("alice", GOOD, NOW)
    assert written.keepalive_at == NOW + timedelta(seconds=400)
    nxt = NOW + timedelta(seconds=70)
    assert store.record_failure("alice", GOOD, expected_version=written.version, failure="temporarily_unavailable",
                                failure_count=1, next_attempt_at=nxt, status=CredentialStatus.DEGRADED)
    row = store.get("alice", GOOD)
    assert row is not None and row.version == written.version  # a status write leaves the fence alone
    assert (row.status, row.failure, row.failure_count) == (CredentialStatus.DEGRADED, "temporarily_unavailable", 1)
    assert row.refresh_at == nxt and row.next_attempt_at == nxt
    assert row.keepalive_at == NOW + timedelta(seconds=400)  # later than the next attempt: kept
    assert store.due(NOW + timedelta(seconds=69), HOUR_AGO, server_keys=[GOOD]) == []
    assert store.due(nxt, HOUR_AGO, server_keys=[GOOD]) == [("alice", GOOD)]
    assert not store.record_failure("alice", GOOD, expected_version=written.version + 1, failure="x",
                                    failure_count=2, next_attempt_at=nxt)
    again = store.compare_and_swap("alice", GOOD, row.version, cred(ttl=100))
    assert again is not None
    row = store.get("alice", GOOD)
    assert row is not None and row.failure_count == 0 and row.next_attempt_at is None
    assert row.status is CredentialStatus.CONNECTED and row.refresh_at == NOW + timedelta(seconds=40)
    store.record_failure("alice", GOOD, expected_version=row.version, failure="invalid_grant", failure_count=1,
                         next_attempt_at=None, status=CredentialStatus.NEEDS_RECONNECT)
    row = store.get("alice", GOOD)
    assert row is not None and row.keepalive_at is None and row.refresh_at is None
    assert store.keepalive_due(NOW + timedelta(days=1)) == []


def test_keepalive_scan_takes_only_what_is_due(store: CredentialStore) -> None:
    store.put("idle", GOOD, cred(ttl=100_000))
    store.put("other", BAD, cred(ttl=100_000))  # a server without an idle limit
    store.put("no-rt", GOOD, Credential(access_token=Secret(canary()), obtained_via=ObtainedVia.CONNECT_FLOW))
    assert store.keepalive_due(NOW + timedelta(seconds=399)) == []
    assert store.keepalive_due(NOW + timedelta(seconds=400)) == [("idle", GOOD)]


def test_a_new_subject_token_releases_held_mints_only(store: CredentialStore) -> None:
    tx = store.put("alice", BAD, cred(via=ObtainedVia.TOKEN_EXCHANGE))
    gh = store.put("alice", GOOD, cred())
    other = store.put("bob", BAD, cred(via=ObtainedVia.TOKEN_EXCHANGE))
    for user, key, row in (("alice", BAD, tx), ("bob", BAD, other)):
        store.record_failure(user, key, expected_version=row.version, failure="invalid_grant", failure_count=1,
                             next_attempt_at=UNTIL_SUBJECT_CHANGES, status=CredentialStatus.DEGRADED)
    store.record_failure("alice", GOOD, expected_version=gh.version, failure="temporarily_unavailable",
                         failure_count=3, next_attempt_at=NOW + timedelta(minutes=10))
    assert store.get("alice", BAD).refresh_at == UNTIL_SUBJECT_CHANGES
    store.put_subject_token("alice", SubjectToken(Secret(canary("subject"))))
    row = store.get("alice", BAD)
    assert row.next_attempt_at is None and row.failure_count == 0
    assert row.refresh_at == NOW + timedelta(seconds=2880)  # its ordinary refresh point again
    assert store.get("alice", GOOD).next_attempt_at == NOW + timedelta(minutes=10)  # refresh tokens: unaffected
    assert store.get("bob", BAD).next_attempt_at == UNTIL_SUBJECT_CHANGES  # another user's: unaffected
