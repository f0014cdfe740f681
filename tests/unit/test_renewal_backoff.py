"""When a renewal may be attempted: per-credential backoff after a transient
failure, no retry after a permanent one, keep-alive of idle refresh tokens.

A real SQLite store and the resolver; the OAuth port is the scripted fake of
test_resolver (the sandbox provider drives the same paths in
tests/integration/test_backoff.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.audit import MemoryAuditSink
from broker.clock import FakeClock
from broker.db import make_engine
from broker.errors import NotConnected, SubjectTokenMissing, UpstreamError
from broker.migrate import upgrade
from broker.models import Credential, CredentialStatus, ObtainedVia, SubjectToken
from broker.resolver import Resolver
from broker.secret import Secret
from broker.servers import ServerConfig
from broker.store import UNTIL_SUBJECT_CHANGES, CredentialStore
from tests.conftest import make_keyring
from tests.secrets import canary
from tests.unit.test_resolver import SERVERS, FakeOAuth

GH = SERVERS["gh"].key
TX = SERVERS["tx"].key
IDLE = 1000.0


class RecordingOAuth(FakeOAuth):
    """The fake, also recording whether each call allowed in-call retries."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.retries: list[bool] = []

    def mint(self, server: ServerConfig, subject_token: Secret, *, retry: bool = True) -> Credential:
        self.retries.append(retry)
        return super().mint(server, subject_token)

    def refresh(self, server: ServerConfig, credential: Credential, *, retry: bool = True) -> Credential:
        self.retries.append(retry)
        return super().refresh(server, credential)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Resolver, CredentialStore, RecordingOAuth, FakeClock]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    upgrade(engine)
    clock = FakeClock()
    store = CredentialStore(engine, make_keyring("A"), clock=clock,
                            idle_seconds={GH: IDLE}.get)
    oauth = RecordingOAuth(clock)
    resolver = Resolver(SERVERS, store, oauth, MemoryAuditSink(), clock, backoff_seconds=10,
                        backoff_max_seconds=3600, rand=lambda: 1.0,
                        connect_url=lambda user, server: f"https://broker.example.com/connect/{server}")
    yield resolver, store, oauth, clock
    engine.dispose()


def subject(store: CredentialStore, clock: FakeClock, user: str = "alice") -> None:
    store.put_subject_token(user, SubjectToken(Secret(canary("subject")), clock.now() + timedelta(days=1)))


def connected(store: CredentialStore, oauth: FakeOAuth, user: str = "alice") -> None:
    store.put(user, GH, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))


def test_transient_failure_backs_off_for_resolves_and_beat(env: Any) -> None:
    resolver, store, oauth, clock = env
    oauth.ttl = 3600
    connected(store, oauth)
    clock.advance(3000)  # past the refresh point, valid for 600 s more
    oauth.fail = UpstreamError(status=503, retryable=True, retry_after=2)
    first = resolver.resolve("alice", "gh")
    assert len(oauth.calls) == 1 and oauth.retries == [False]  # one attempt: it is still valid
    row = store.get("alice", GH)
    assert row.status is CredentialStatus.DEGRADED and row.failure_count == 1
    assert row.next_attempt_at == clock.now() + timedelta(seconds=10)  # max(Retry-After 2, 10 s)
    assert row.refresh_at == row.next_attempt_at  # out of the beat's range until then
    for _ in range(19):  # resolves every 0.5 s during the backoff: served stale, nobody asked
        clock.advance(0.5)
        assert resolver.resolve("alice", "gh") == first
        assert resolver.renew_if_due("alice", "gh") is not None
    assert len(oauth.calls) == 1
    clock.advance(0.5)
    resolver.resolve("alice", "gh")
    assert len(oauth.calls) == 2
    row = store.get("alice", GH)
    assert row.failure_count == 2 and row.next_attempt_at == clock.now() + timedelta(seconds=20)
    clock.advance(20)
    assert resolver.renew_if_due("alice", "gh") is not None and len(oauth.calls) == 3
    oauth.fail = None
    clock.advance(40)
    renewed = resolver.renew_if_due("alice", "gh")
    assert renewed is not None and len(oauth.calls) == 4
    row = store.get("alice", GH)
    assert row.status is CredentialStatus.CONNECTED and row.failure_count == 0 and row.next_attempt_at is None
    assert row.failure is None


def test_an_expired_credential_is_renewed_with_retries_even_in_backoff(env: Any) -> None:
    resolver, store, oauth, clock = env
    connected(store, oauth)
    clock.advance(590)
    oauth.fail = UpstreamError(status=503, retryable=True, retry_after=120)
    resolver.resolve("alice", "gh")
    clock.advance(20)  # expired, next attempt still 100 s away: the caller has nothing else
    with pytest.raises(UpstreamError):
        resolver.resolve("alice", "gh")
    assert oauth.retries == [False, True]
    # the beat leaves an expired credential in backoff alone
    assert resolver.renew_if_due("alice", "gh") is None and len(oauth.calls) == 2


@pytest.mark.parametrize("code", ["invalid_grant", "invalid_client", "invalid_scope", "unauthorized_client"])
def test_permanent_refresh_failure_needs_reconnect_and_is_never_retried(env: Any, code: str) -> None:
    resolver, store, oauth, clock = env
    connected(store, oauth)
    clock.advance(500)
    oauth.fail = UpstreamError(status=400, oauth_error=code)
    served = resolver.resolve("alice", "gh")
    row = store.get("alice", GH)
    assert row.status is CredentialStatus.NEEDS_RECONNECT and row.failure == code
    assert row.keepalive_at is None and row.refresh_at is None
    for _ in range(50):
        clock.advance(1)
        assert resolver.resolve("alice", "gh") == served
        assert resolver.renew_if_due("alice", "gh") is None
    clock.advance(100)
    with pytest.raises(NotConnected):
        resolver.resolve("alice", "gh")
    assert len(oauth.calls) == 1


def test_permanent_mint_failure_waits_for_a_new_subject_token(env: Any) -> None:
    resolver, store, oauth, clock = env
    subject(store, clock)
    resolver.resolve("alice", "tx")
    clock.advance(500)
    oauth.fail = UpstreamError(status=400, oauth_error="invalid_grant")
    stale = resolver.resolve("alice", "tx")
    row = store.get("alice", TX)
    assert row.status is CredentialStatus.DEGRADED and row.next_attempt_at == UNTIL_SUBJECT_CHANGES
    clock.advance(200)  # expired now: the refusal is repeated without asking the server
    for _ in range(5):
        with pytest.raises(UpstreamError) as info:
            resolver.resolve("alice", "tx")
        assert info.value.oauth_error == "invalid_grant"
    assert resolver.renew_if_due("alice", "tx") is None
    assert len(oauth.calls) == 2
    oauth.fail = None
    subject(store, clock)  # the gateway signs the user in again
    fresh = resolver.resolve("alice", "tx")
    assert fresh != stale and len(oauth.calls) == 3
    assert store.get("alice", TX).next_attempt_at is None


def test_missing_subject_token_is_held_until_one_arrives(env: Any) -> None:
    resolver, store, oauth, clock = env
    subject(store, clock)
    resolver.resolve("alice", "tx")
    store.delete_subject_token("alice")
    clock.advance(500)
    resolver.resolve("alice", "tx")  # served stale
    assert store.get("alice", TX).next_attempt_at == UNTIL_SUBJECT_CHANGES
    clock.advance(200)
    with pytest.raises(SubjectTokenMissing):
        resolver.resolve("alice", "tx")
    subject(store, clock)
    resolver.resolve("alice", "tx")
    assert len(oauth.calls) == 2


def test_keepalive_renews_an_idle_refresh_token_before_its_idle_limit(env: Any) -> None:
    resolver, store, oauth, clock = env
    oauth.ttl = 100_000  # the access token is nowhere near its refresh point
    connected(store, oauth)
    row = store.get("alice", GH)
    assert row.keepalive_at == clock.now() + timedelta(seconds=IDLE * 0.8)
    assert store.keepalive_due(clock.now() + timedelta(seconds=799)) == []
    clock.advance(800)
    assert store.keepalive_due(clock.now()) == [("alice", GH)]
    assert resolver.renew_if_due("alice", "gh") is not None and len(oauth.calls) == 1
    assert (resolver.audit.events[-1].action.value, resolver.audit.events[-1].reason) == ("refresh", "keepalive")
    row = store.get("alice", GH)
    assert row.last_used_at is None  # a keep-alive is not a use
    assert row.keepalive_at == clock.now() + timedelta(seconds=IDLE * 0.8)
    assert store.keepalive_due(clock.now()) == []
    # a failed keep-alive backs off like any renewal, and leaves the range meanwhile
    clock.advance(800)
    oauth.fail = UpstreamError(status=502, retryable=True)
    resolver.renew_if_due("alice", "gh")
    assert store.keepalive_due(clock.now() + timedelta(seconds=9)) == []
    assert store.keepalive_due(clock.now() + timedelta(seconds=10)) == [("alice", GH)]
    # exchange credentials carry no keep-alive
    subject(store, clock)
    oauth.fail = None
    resolver.resolve("alice", "tx")
    assert store.get("alice", TX).keepalive_at is None


def test_a_credential_without_refresh_token_leaves_the_due_scan_until_it_expires(env: Any) -> None:
    resolver, store, oauth, clock = env
    store.put("alice", GH, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=False))
    store.touch("alice", GH, clock.now())
    clock.advance(500)
    since = clock.now() - timedelta(hours=1)
    assert store.due(clock.now(), since, server_keys=[GH]) == [("alice", GH)]
    resolver.renew_if_due("alice", "gh")
    assert store.due(clock.now(), since, server_keys=[GH]) == []  # nothing to try before it expires
    assert resolver.resolve("alice", "gh").value.reveal().startswith("token ")
    clock.advance(101)
    with pytest.raises(NotConnected):
        resolver.resolve("alice", "gh")
    row = store.get("alice", GH)
    assert row.status is CredentialStatus.NEEDS_RECONNECT and oauth.calls == []
