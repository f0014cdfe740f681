"""The resolve ordering over a real SQLite store and a scripted OAuth port.

The OAuth port is an in-memory fake here (the protocol is tested against the
real sandbox provider in tests/integration); this file pins the ordering.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.audit import MemoryAuditSink
from broker.clock import FakeClock
from broker.db import make_engine
from broker.errors import (
    NotConnected,
    PolicyDenied,
    StoreDisabled,
    SubjectTokenMissing,
    UnknownServer,
    UpstreamError,
)
from broker.migrate import upgrade
from broker.models import Credential, CredentialStatus, ObtainedVia, SubjectToken
from broker.policy import PolicyDecision, PolicyInput
from broker.resolver import Resolver
from broker.secret import Secret
from broker.servers import ServerConfig, parse_servers
from broker.store import CredentialStore
from tests.conftest import make_keyring
from tests.secrets import canary

SERVERS = parse_servers({"servers": [
    {"name": "tx", "url": "https://tx.example.com/mcp",
     "auth_broker": {"mode": "token_exchange", "token_endpoint": "https://idp.example.com/token",
                     "client_id": "c", "client_secret": "s" * 20, "audience": "tx-api", "scopes": ["read"]}},
    {"name": "obo", "url": "https://obo.example.com/mcp",
     "auth_broker": {"mode": "entra_obo", "token_endpoint": "https://login.example.com/token",
                     "client_id": "c", "client_secret": "s" * 20, "scopes": ["api://obo/.default"]}},
    {"name": "gh", "url": "https://gh.example.com/mcp",
     "auth_broker": {"mode": "oauth_connect", "token_endpoint": "https://gh.example.com/token",
                     "authorization_endpoint": "https://gh.example.com/authorize", "client_id": "c",
                     "header": "X-Upstream-Token", "header_format": "token {token}"}},
]})


class FakeOAuth:
    """Scripted authorization server: counts calls, fails on demand."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, str]] = []
        self.fail: UpstreamError | None = None
        self.ttl = 600

    def _issue(self, via: ObtainedVia, refresh: bool = False) -> Credential:
        now = self.clock.now()
        return Credential(access_token=Secret(canary("at")), obtained_via=via, issued_at=now,
                          expires_at=now + timedelta(seconds=self.ttl), scopes=("read",),
                          refresh_token=Secret(canary("rt")) if refresh else None)

    def mint(self, server: ServerConfig, subject_token: Secret, *, retry: bool = True) -> Credential:
        self.calls.append(("mint", subject_token.reveal()))
        if self.fail:
            raise self.fail
        via = ObtainedVia.ENTRA_OBO if server.mode.value == "entra_obo" else ObtainedVia.TOKEN_EXCHANGE
        return self._issue(via)

    def refresh(self, server: ServerConfig, credential: Credential, *, retry: bool = True) -> Credential:
        assert credential.refresh_token is not None
        self.calls.append(("refresh", credential.refresh_token.reveal()))
        if self.fail:
            raise self.fail
        return self._issue(ObtainedVia.CONNECT_FLOW, refresh=True)

    def redeem_code(self, *a: object) -> Credential:
        raise AssertionError("not used")

    def revoke(self, *a: object) -> bool:
        return False

    def authorize_url(self, *a: object) -> str:
        return "https://gh.example.com/authorize?state=x"


@pytest.fixture
def env(tmp_path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    upgrade(engine)
    clock = FakeClock()
    store = CredentialStore(engine, make_keyring("A"), clock=clock)
    oauth = FakeOAuth(clock)
    audit = MemoryAuditSink()
    resolver = Resolver(SERVERS, store, oauth, audit, clock,
                        connect_url=lambda user, server: f"https://broker.example.com/connect/{server}")
    yield resolver, store, oauth, audit, clock
    engine.dispose()


def subject(store: CredentialStore, user: str, clock: FakeClock, ttl: int = 3600) -> None:
    store.put_subject_token(user, SubjectToken(Secret(canary("subject")), clock.now() + timedelta(seconds=ttl)))


def test_mint_then_inject_from_cache(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    subject(store, "alice", clock)
    first = resolver.resolve("alice", "tx", request_id="req-1")
    assert first.header == "Authorization" and first.value.reveal().startswith("Bearer cbtest-at-")
    assert first.obtained_via == "token_exchange"
    second = resolver.resolve("alice", "tx")
    assert second.value == first.value
    assert [c[0] for c in oauth.calls] == ["mint"]
    assert [(e.action.value, e.outcome.value) for e in audit.events] == [("acquire", "success"), ("inject", "success")]
    assert audit.events[0].request_id == "req-1"


def test_obo_mode_and_custom_header(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    subject(store, "alice", clock)
    assert resolver.resolve("alice", "obo").obtained_via == "entra_obo"


def test_subject_token_missing_or_expired_calls_nobody(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    with pytest.raises(SubjectTokenMissing):
        resolver.resolve("alice", "tx")
    subject(store, "alice", clock, ttl=10)
    clock.advance(11)
    with pytest.raises(SubjectTokenMissing):
        resolver.resolve("alice", "tx")
    assert oauth.calls == []
    assert audit.events[-1].reason == "subject_token_missing"


def test_near_expiry_re_mints(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    subject(store, "alice", clock, ttl=100000)
    first = resolver.resolve("alice", "tx")
    clock.advance(600 * 0.8 + 1)  # past 80% of the lifetime
    second = resolver.resolve("alice", "tx")
    assert second.value != first.value and len(oauth.calls) == 2
    assert audit.events[-1].action.value == "refresh"


def test_stale_if_error_then_error_once_expired(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    subject(store, "alice", clock, ttl=100000)
    first = resolver.resolve("alice", "tx")
    clock.advance(590)
    oauth.fail = UpstreamError(status=503, retryable=True)
    stale = resolver.resolve("alice", "tx")
    assert stale.value == first.value
    assert audit.events[-1].outcome.value == "stale"
    stored = store.get("alice", SERVERS["tx"].key)
    assert stored is not None and stored.status is CredentialStatus.DEGRADED
    clock.advance(20)
    with pytest.raises(UpstreamError) as info:
        resolver.resolve("alice", "tx")
    assert info.value.status == 503
    oauth.fail = None
    assert resolver.resolve("alice", "tx").value != first.value
    stored = store.get("alice", SERVERS["tx"].key)
    assert stored is not None and stored.status is CredentialStatus.CONNECTED


def test_connect_never_connected_carries_url_and_reason(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    with pytest.raises(NotConnected) as info:
        resolver.resolve("alice", "gh")
    assert info.value.reason == "never_connected"
    assert info.value.connect_url == "https://broker.example.com/connect/gh"
    assert info.value.to_dict()["error"] == "not_connected"
    assert audit.events[-1].action.value == "connect"


def test_connect_refresh_invalid_grant_needs_reconnect(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    key = SERVERS["gh"].key
    store.put("alice", key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))
    assert resolver.resolve("alice", "gh").value.reveal().startswith("token cbtest-at-")
    clock.advance(500)
    refreshed = resolver.resolve("alice", "gh")
    assert oauth.calls[-1][0] == "refresh"
    stored = store.get("alice", key)
    assert stored is not None and stored.credential.access_token.reveal() in refreshed.value.reveal()
    clock.advance(500)
    oauth.fail = UpstreamError(status=400, oauth_error="invalid_grant")
    still = resolver.resolve("alice", "gh")  # still valid: served stale
    assert still == refreshed
    stored = store.get("alice", key)
    assert stored is not None and stored.status is CredentialStatus.NEEDS_RECONNECT
    calls = len(oauth.calls)
    clock.advance(200)
    with pytest.raises(NotConnected) as info:
        resolver.resolve("alice", "gh")
    assert info.value.reason == "reconnect_required" and info.value.connect_url
    assert len(oauth.calls) == calls  # no refresh attempted once marked


def test_connect_without_refresh_token_expired_reconnect(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    store.put("alice", SERVERS["gh"].key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=False))
    clock.advance(601)
    with pytest.raises(NotConnected) as info:
        resolver.resolve("alice", "gh")
    assert info.value.reason == "reconnect_required" and oauth.calls == []
    stored = store.get("alice", SERVERS["gh"].key)
    assert stored is not None and stored.status is CredentialStatus.NEEDS_RECONNECT and stored.refresh_at is None


def test_per_user_isolation(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    subject(store, "alice", clock)
    a = resolver.resolve("alice", "tx")
    with pytest.raises(SubjectTokenMissing):
        resolver.resolve("bob", "tx")
    with pytest.raises(SubjectTokenMissing):
        resolver.resolve("alice:x", "tx")
    store.put("alice", SERVERS["gh"].key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))
    with pytest.raises(NotConnected):
        resolver.resolve("bob", "gh")
    subject(store, "bob", clock)
    assert resolver.resolve("bob", "tx").value != a.value


@pytest.mark.parametrize("answer", [False, (False, "after hours"), PolicyDecision(False, "nope")])
def test_policy_denies(env, answer) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    seen: list[PolicyInput] = []

    def hook(data: PolicyInput) -> object:
        seen.append(data)
        return answer

    resolver.policy = hook
    subject(store, "alice", clock)
    with pytest.raises(PolicyDenied):
        resolver.resolve("alice", "tx")
    assert seen[0].user_id == "alice" and seen[0].server == "tx" and seen[0].scopes == ("read",)
    assert not any("cbtest" in repr(v) for v in seen[0].__dict__.values())
    assert audit.events[-1].outcome.value == "denied"


def test_policy_exception_denies_and_says_so(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    resolver.policy = lambda data: 1 / 0
    subject(store, "alice", clock)
    with pytest.raises(PolicyDenied, match="policy_error"):
        resolver.resolve("alice", "tx")
    resolver.policy = lambda data: (True, None)
    assert resolver.resolve("alice", "tx").server == "tx"


def test_unknown_server_and_disabled_store(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    with pytest.raises(UnknownServer):
        resolver.resolve("alice", "nope")
    disabled = Resolver(SERVERS, CredentialStore(store.engine, None), oauth, audit, clock)
    with pytest.raises(StoreDisabled):
        disabled.resolve("alice", "tx")


def test_proactive_renewal_only_when_due(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    subject(store, "alice", clock, ttl=100000)
    resolver.resolve("alice", "tx")
    assert resolver.renew_if_due("alice", "tx") is not None and len(oauth.calls) == 1
    clock.advance(481)
    renewed = resolver.renew_if_due("alice", "tx")
    assert renewed is not None and len(oauth.calls) == 2
    assert resolver.renew_if_due("alice", "tx") is not None and len(oauth.calls) == 2  # already done


def test_a_lease_held_elsewhere_keeps_this_flight_off_the_provider(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    key = SERVERS["gh"].key
    store.put("alice", key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))
    clock.advance(560)  # due, still valid
    row = store.get("alice", key)
    assert row is not None and store.take_lease(row, "other-flight", 60).taken
    served = resolver.acquire("alice", "gh", owner="me")
    assert served.reason == "renewal_in_progress" and oauth.calls == []
    # Expired: wait for the holder; it stores a renewal, which this flight serves.
    clock.advance(100)
    renewed = oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True)

    def holder_finishes(_: float) -> None:
        assert store.compare_and_swap("alice", key, row.version, renewed, lease_owner="other-flight") is not None

    resolver._sleep = holder_finishes
    got = resolver.acquire("alice", "gh", owner="me")
    assert got.reason == "refreshed_elsewhere" and got.credential == renewed and oauth.calls == []


def test_an_expired_lease_then_invalid_grant_is_a_lost_rotation(env) -> None:  # type: ignore[no-untyped-def]
    from tests.cluster import wait_for

    resolver, store, oauth, audit, clock = env
    key = SERVERS["gh"].key
    store.put("alice", key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))
    row = store.get("alice", key)
    assert row is not None and store.take_lease(row, "killed-flight", 0.2).taken
    lost: list[str] = []
    resolver.on_rotation_lost = lost.append
    resolver.lease_seconds = 0.05  # do not wait long for the dead flight while its lease runs
    clock.advance(700)
    oauth.fail = UpstreamError("spent", oauth_error="invalid_grant", status=400)

    def attempt() -> bool:
        try:
            resolver.acquire("alice", "gh", owner="next")
        except NotConnected:
            return True
        except Exception:  # noqa: BLE001 - the dead flight's lease has not expired yet
            return False
        return False

    wait_for(attempt, 5, 0.05, what="the dead flight's lease to expire")
    after = store.get("alice", key)
    assert after is not None and after.status is CredentialStatus.NEEDS_RECONNECT and after.failure == "rotation_lost"
    assert lost == ["gh"] and len(oauth.calls) == 1  # presented once, not retried
    assert any(e.reason == "rotation_lost" for e in audit.events)


def test_a_status_write_mid_refresh_does_not_strand_the_rotated_token(env) -> None:  # type: ignore[no-untyped-def]
    resolver, store, oauth, audit, clock = env
    key = SERVERS["gh"].key
    store.put("alice", key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))
    clock.advance(700)
    real_refresh = oauth.refresh

    def refresh_with_status_write(server: ServerConfig, credential: Credential, **_: object) -> Credential:
        store.set_status("alice", key, CredentialStatus.DEGRADED, failure="temporarily_unavailable")
        return real_refresh(server, credential)

    oauth.refresh = refresh_with_status_write
    got = resolver.acquire("alice", "gh", owner="me")
    stored = store.get("alice", key)
    assert stored is not None and stored.credential == got.credential  # served only what is stored
    assert stored.status is CredentialStatus.CONNECTED and stored.lease_owner is None


def test_a_lease_lost_mid_call_serves_nothing_unstored(env) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import update

    from broker.db import credentials as T
    from broker.errors import ServiceUnavailable

    resolver, store, oauth, audit, clock = env
    key = SERVERS["gh"].key
    store.put("alice", key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))
    clock.advance(700)
    real_refresh = oauth.refresh

    def refresh_while_taken_over(server: ServerConfig, credential: Credential, **_: object) -> Credential:
        with store.engine.begin() as conn:  # as if our lease expired and another flight took it
            conn.execute(update(T).values(lease_owner="usurper"))
        return real_refresh(server, credential)

    oauth.refresh = refresh_while_taken_over
    before = store.get("alice", key)
    with pytest.raises(ServiceUnavailable):
        resolver.acquire("alice", "gh", owner="me")
    after = store.get("alice", key)
    assert before is not None and after is not None and after.version == before.version


def test_a_refresh_with_no_answer_leaves_its_outcome_unknown(env) -> None:  # type: ignore[no-untyped-def]
    from broker.errors import UpstreamOutcomeUnknown

    resolver, store, oauth, audit, clock = env
    key = SERVERS["gh"].key
    store.put("alice", key, oauth._issue(ObtainedVia.CONNECT_FLOW, refresh=True))
    clock.advance(700)  # expired
    oauth.fail = UpstreamOutcomeUnknown("authorization server timed out", retryable=True)
    with pytest.raises(UpstreamError):
        resolver.acquire("alice", "gh", owner="first")
    row = store.get("alice", key)
    assert row is not None and row.lease_owner == "first"  # expired, not released
    lost: list[str] = []
    resolver.on_rotation_lost = lost.append
    oauth.fail = UpstreamError("spent", oauth_error="invalid_grant", status=400)
    with pytest.raises(NotConnected):
        resolver.acquire("alice", "gh", owner="second")
    after = store.get("alice", key)
    assert after is not None and after.failure == "rotation_lost" and lost == ["gh"]
    assert len(oauth.calls) == 2


def test_dpop_server_renews_a_credential_stored_without_a_key(tmp_path: object, clock: FakeClock) -> None:
    """Turning ``dpop: true`` on: a Bearer credential stored before is re-minted with a key, not served."""
    from dataclasses import replace as _replace
    from pathlib import Path

    from broker.dpop import DPoPKey
    from broker.servers import ServerRegistry

    engine = make_engine(f"sqlite:///{Path(str(tmp_path)) / 'dpop.db'}")
    upgrade(engine)
    store = CredentialStore(engine, make_keyring("A"), clock=clock)
    tx = SERVERS["tx"]
    dp = _replace(tx, auth_broker=_replace(tx.auth_broker, dpop=True, header_format="DPoP {token}"))
    oauth = FakeOAuth(clock)
    minted = oauth._issue

    def bound(via: ObtainedVia, refresh: bool = False) -> Credential:
        return minted(via, refresh).with_changes(token_type="DPoP", dpop_key=DPoPKey.generate())

    oauth._issue = bound  # type: ignore[method-assign]
    resolver = Resolver(ServerRegistry([dp]), store, oauth, MemoryAuditSink(), clock)
    store.put_subject_token("alice", SubjectToken(Secret(canary("subject")), None))
    store.compare_and_swap("alice", dp.key, None, minted(ObtainedVia.TOKEN_EXCHANGE))
    resolved = resolver.resolve("alice", "tx", method="GET", url="https://tx.example.com/mcp")
    assert [c[0] for c in oauth.calls] == ["mint"] and resolved.dpop is not None
    assert resolved.value.reveal().startswith("DPoP ")
    stored = store.get("alice", dp.key)
    assert stored is not None and stored.credential.dpop_key == resolved.dpop_key
    resolver.resolve("alice", "tx", method="GET", url="https://tx.example.com/mcp")
    assert len(oauth.calls) == 1  # now bound: served from the store
    engine.dispose()
