"""Every fault the sandbox can inject at the token endpoint, over real HTTP.

Transient faults (5xx, 429) are retried within the budget and succeed;
slow, broken or hostile answers end in a clear, secret-free UpstreamError;
and after any failure nothing is stored.
"""

from __future__ import annotations

import logging
import time
from http.client import HTTPConnection
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.audit import Action, MemoryAuditSink, Outcome
from broker.clock import FakeClock
from broker.connect import ConnectError, ConnectFlow
from broker.errors import NotConnected, UpstreamError
from broker.models import CredentialStatus, SubjectToken
from broker.oauth import (
    MetadataCache,
    OAuthClient,
    TokenEndpointSender,
    make_http_client,
)
from broker.resolver import Resolver
from broker.sandbox import SandboxHandle
from broker.secret import Secret
from broker.servers import ServerRegistry, parse_servers
from broker.settings import Settings
from broker.state import MemoryStateStore
from broker.store import CredentialStore
from tests.secrets import assert_no_leak, register

from tests.integration.oauth_harness import (  # noqa: F401 - fixtures
    CALLBACK_URL, RegisteringProvider, client_secret, sandbox, store)

pytestmark = pytest.mark.integration

FAST = Settings(http_read_timeout=3.0, provider_retry_seconds=5.0, provider_max_attempts=3)


@pytest.fixture
def servers(sandbox: SandboxHandle, client_secret: str) -> ServerRegistry:
    ab = {"token_endpoint": f"{sandbox.url}/token", "client_id": "broker-client", "client_secret": client_secret}
    return parse_servers({"servers": [
        {"name": "tx", "url": "https://tx.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "tx-api"}},
        {"name": "gh", "url": "https://gh.upstream.test/mcp",
         "auth_broker": {"mode": "oauth_connect", **ab, "authorization_endpoint": f"{sandbox.url}/authorize"}},
        {"name": "disco", "url": "https://disco.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", "issuer": sandbox.url, "client_id": "broker-client",
                         "client_secret": client_secret}},
    ]})


class Harness:
    """A resolver and a connect flow over one sender built from ``settings``."""

    def __init__(self, sandbox: SandboxHandle, servers: ServerRegistry, store: CredentialStore,
                 clock: FakeClock, settings: Settings) -> None:
        self.sandbox = sandbox
        self.provider = sandbox.provider
        self.servers = servers
        self.store = store
        self.clock = clock
        self.http = make_http_client(settings)
        self.oauth = OAuthClient(TokenEndpointSender.from_settings(settings, self.http), MetadataCache(), clock)
        self.audit = MemoryAuditSink()
        self.resolver = Resolver(servers, store, self.oauth, self.audit, clock)
        self.flow = ConnectFlow(servers, store, self.oauth, MemoryStateStore(), self.audit, clock, CALLBACK_URL)
        self.subject = self.provider.issue_subject_token("alice")
        store.put_subject_token("alice", SubjectToken(Secret(self.subject)))

    def close(self) -> None:
        self.http.close()

    def nothing_stored(self, user: str = "alice") -> bool:
        return all(self.store.get(user, s.key) is None for s in self.servers.values()) and self.store.list(user) == []

    def consent(self, user: str = "alice") -> dict[str, str]:
        """Start a connect flow and approve it; plain http.client so no log prints the code."""
        parts = urlsplit(f"{self.flow.start(user, 'gh').connect_url}&consent=approve&user={user}")
        conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
        try:
            conn.request("GET", f"{parts.path}?{parts.query}")
            response = conn.getresponse()
            response.read()
            location = response.getheader("Location") or ""
        finally:
            conn.close()
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        register(query["code"])
        return query


def harness(request: pytest.FixtureRequest, settings: Settings) -> Harness:
    h = Harness(request.getfixturevalue("sandbox"), request.getfixturevalue("servers"),
                request.getfixturevalue("store"), request.getfixturevalue("clock"), settings)
    request.addfinalizer(h.close)
    return h


@pytest.fixture
def h(request: pytest.FixtureRequest) -> Harness:
    return harness(request, FAST)


def faults_served(h: Harness) -> list[str | None]:
    return [r["fault"] for r in h.provider.requests("token")]


def assert_clean(exc: BaseException, *secrets: str) -> None:
    """No secret in the error's str, repr, args or dict form."""
    texts = [str(exc), repr(exc), repr(exc.args)]
    if hasattr(exc, "to_dict"):
        texts.append(repr(exc.to_dict()))
    for text in texts:
        for secret in secrets:
            assert secret not in text
        assert_no_leak(text, "an error")


# -- transient faults are retried ------------------------------------------------------------


def test_5xx_once_then_success_is_retried_and_stored(h: Harness) -> None:
    h.provider.set_fault("token", "5xx", count=1)

    resolved = h.resolver.resolve("alice", "tx")

    assert faults_served(h) == ["5xx", None]
    stored = h.store.get("alice", h.servers["tx"].key)
    assert stored is not None and resolved.value.reveal() == f"Bearer {stored.credential.access_token.reveal()}"


def test_429_waits_for_retry_after_then_succeeds(h: Harness) -> None:
    h.provider.set_fault("token", "429", count=1, retry_after=1)

    started = time.monotonic()
    h.resolver.resolve("alice", "tx")
    elapsed = time.monotonic() - started

    assert elapsed >= 0.9
    assert elapsed < 3.0
    first, second = h.provider.requests("token")
    assert (first["fault"], second["fault"]) == ("429", None)
    assert second["at"] - first["at"] >= 0.9
    assert h.store.get("alice", h.servers["tx"].key) is not None


def test_persistent_5xx_gives_up_within_the_budget_and_stores_nothing(h: Harness) -> None:
    h.provider.set_fault("token", "5xx")

    with pytest.raises(UpstreamError) as info:
        h.resolver.resolve("alice", "tx")

    err = info.value
    assert (err.status, err.oauth_error, err.retryable) == (503, "temporarily_unavailable", True)
    assert faults_served(h) == ["5xx"] * FAST.provider_max_attempts
    assert h.nothing_stored()
    assert (h.audit.events[-1].action, h.audit.events[-1].outcome) == (Action.ACQUIRE, Outcome.FAILURE)


def test_retry_after_longer_than_the_budget_gives_up_at_once(h: Harness) -> None:
    h.provider.set_fault("token", "429", retry_after=30)

    started = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        h.resolver.resolve("alice", "tx")

    assert time.monotonic() - started < 2.0
    assert (info.value.status, info.value.retry_after) == (429, 30.0)
    assert faults_served(h) == ["429"]
    assert h.nothing_stored()


def test_hang_times_out_with_a_short_read_timeout(request: pytest.FixtureRequest) -> None:
    h = harness(request, Settings(http_read_timeout=0.5, provider_retry_seconds=1))
    h.provider.set_fault("token", "hang", hang_seconds=5)

    started = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        h.resolver.resolve("alice", "tx")
    elapsed = time.monotonic() - started

    assert "timed out" in str(info.value)
    assert info.value.status is None and info.value.retryable
    assert 0.5 <= elapsed < 3.0
    assert 1 <= len(h.provider.requests("token")) <= 3
    assert h.nothing_stored()


# -- broken answers are clear errors, never retried, never stored ----------------------------


@pytest.mark.parametrize(("mode", "message"), [
    ("malformed", "authorization server returned malformed JSON"),
    ("no_access_token", "authorization server returned a response without access_token"),
    ("huge", "authorization server response too large"),
])
def test_broken_token_response_is_a_clear_upstream_error(h: Harness, mode: str, message: str) -> None:
    h.provider.set_fault("token", mode)

    with pytest.raises(UpstreamError) as info:
        h.resolver.resolve("alice", "tx")

    err = info.value
    assert str(err) == message
    assert err.status == 200 and not err.retryable
    assert err.to_dict() == {"error": "upstream_error", "message": message, "status": 200, "oauth_error": None}
    assert faults_served(h) == [mode]
    assert h.nothing_stored()
    assert (h.audit.events[-1].outcome, h.audit.events[-1].reason) == (Outcome.FAILURE, "upstream_error")


@pytest.mark.parametrize("mode", ["malformed", "no_access_token", "huge", "echo_secret", "5xx"])
def test_broken_code_redemption_stores_nothing(h: Harness, mode: str) -> None:
    query = h.consent()
    h.provider.set_fault("token", mode)

    with pytest.raises(UpstreamError) as info:  # gateway mode: POST /v1/connect/complete answers 502
        h.flow.complete(query["state"], query["code"], "alice")

    assert info.value.code == "upstream_error"
    assert_clean(info.value, query["code"])
    assert h.nothing_stored()
    assert h.audit.events[-1].action is Action.CONNECT and h.audit.events[-1].outcome is Outcome.FAILURE


# -- a server that echoes secrets back -----------------------------------------------------------


def test_echoed_secrets_reach_no_error_and_no_log(h: Harness, client_secret: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h.provider.set_fault("token", "echo_secret")

    with pytest.raises(UpstreamError) as info:
        h.resolver.resolve("alice", "tx")

    (request,) = h.provider.requests("token")
    assert request["fault"] == "echo_secret"
    assert request["form"]["client_secret"] == client_secret  # it did see both, and echoed them
    err = info.value
    assert (err.status, err.oauth_error, err.retryable) == (400, "invalid_request", False)
    assert_clean(err, client_secret, h.subject)
    assert client_secret not in caplog.text and h.subject not in caplog.text
    assert "token request failed" in caplog.text  # the failure was logged, without the body
    assert all("rejected client_secret" not in r.getMessage() for r in caplog.records)
    assert h.nothing_stored()
    assert all(e.reason in (None, "invalid_request") for e in h.audit.events)


def test_echoed_refresh_token_is_not_stored_or_shown(h: Harness, client_secret: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    query = h.consent()
    h.flow.complete(query["state"], query["code"], "alice")
    key = h.servers["gh"].key
    before = h.store.get("alice", key)
    assert before is not None and before.credential.refresh_token is not None
    refresh_token = before.credential.refresh_token.reveal()
    h.provider.set_fault("token", "echo_secret")
    h.clock.advance(3600)  # past the refresh point (and expiry) of a one-hour token

    with pytest.raises(NotConnected) as info:
        h.resolver.resolve("alice", "gh")
    assert info.value.reason == "reconnect_required"

    assert_clean(info.value, client_secret, refresh_token)
    assert client_secret not in caplog.text and refresh_token not in caplog.text
    after = h.store.get("alice", key)
    assert after is not None and after.status is CredentialStatus.NEEDS_RECONNECT
    assert after.credential.refresh_token == before.credential.refresh_token
    assert after.credential.access_token == before.credential.access_token


def test_failed_refresh_of_a_valid_credential_keeps_it_and_marks_degraded(h: Harness) -> None:
    query = h.consent()
    h.flow.complete(query["state"], query["code"], "alice")
    key = h.servers["gh"].key
    before = h.store.get("alice", key)
    assert before is not None
    h.provider.set_fault("token", "malformed")
    h.clock.advance(3000)  # due (80 % of an hour), still valid

    resolved = h.resolver.resolve("alice", "gh")

    assert resolved.value.reveal() == f"Bearer {before.credential.access_token.reveal()}"  # stale-if-error
    after = h.store.get("alice", key)
    assert after is not None and after.status is CredentialStatus.DEGRADED
    assert after.credential.refresh_token == before.credential.refresh_token
    assert h.audit.events[-1].outcome is Outcome.STALE


# -- discovery faults --------------------------------------------------------------------------


def test_metadata_5xx_once_is_retried_then_discovery_mints(h: Harness) -> None:
    h.provider.set_fault("metadata", "5xx", count=1)

    h.resolver.resolve("alice", "disco")

    assert [r["fault"] for r in h.provider.requests("metadata")] == ["5xx", None]
    assert [r["path"] for r in h.provider.requests("token")] == ["/token"]
    assert h.store.get("alice", h.servers["disco"].key) is not None


def test_unusable_metadata_is_a_clear_error_and_nothing_is_sent(h: Harness) -> None:
    h.provider.set_fault("metadata", "malformed")

    with pytest.raises(UpstreamError, match="metadata"):
        h.resolver.resolve("alice", "disco")

    assert len(h.provider.requests("metadata")) == 2  # RFC 8414, then OpenID Connect
    assert h.provider.requests("token") == []
    assert h.nothing_stored()
