"""The connect flow end to end: Redis state, the sandbox's consent page, a real store.

start -> the user's browser at the provider's /authorize -> the 302 back to
the callback -> code redeemed with the bound PKCE verifier -> stored for the
user who started the flow, and nobody else. Gateway mode (``flow``): the
gateway completes for the user it authenticated; browser mode
(``browser_flow``): the link binds one browser and the user confirms. Then
disconnect revokes upstream.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from sqlalchemy import Engine

from broker.audit import Action, MemoryAuditSink, Outcome
from broker.clock import FakeClock
from broker.connect import ConfirmPrompt, ConnectError, ConnectFlow, ConnectResult
from broker.crypto import Sealer
from broker.errors import BrokerError, ConnectUserMismatch, InvalidRequest, InvalidState, NotConnected, UpstreamError
from broker.models import CredentialStatus, ObtainedVia
from broker.oauth import (
    OAuthClient,
)
from broker.resolver import Resolver
from sandbox import SandboxHandle, s256
from broker.servers import ServerRegistry, parse_servers
from broker.state import STATE_PREFIX, RedisStateStore
from broker.store import CredentialStore
from tests.conftest import make_keyring
from tests.secrets import register

from tests.integration.oauth_harness import (  # noqa: F401 - fixtures
    CALLBACK_URL, RegisteringProvider, client_secret, sandbox, store)

pytestmark = pytest.mark.integration



def registry(sandbox_url: str, client_secret: str, gh_url: str = "https://gh.upstream.test/mcp") -> ServerRegistry:
    base = {"token_endpoint": f"{sandbox_url}/token", "authorization_endpoint": f"{sandbox_url}/authorize",
            "scopes": ["repo"]}
    return parse_servers({"servers": [
        {"name": "gh", "url": gh_url,
         "auth_broker": {"mode": "oauth_connect", **base, "revocation_endpoint": f"{sandbox_url}/revoke",
                         "client_id": "broker-client", "client_secret": client_secret}},
        {"name": "gh-public", "url": "https://public.upstream.test/mcp",
         "auth_broker": {"mode": "oauth_connect", **base, "client_id": "public-client"}},
        {"name": "tx", "url": "https://tx.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", "token_endpoint": f"{sandbox_url}/token",
                         "client_id": "broker-client", "client_secret": client_secret}},
    ]})


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def audit() -> MemoryAuditSink:
    return MemoryAuditSink()


def make_flow(sandbox: SandboxHandle, client_secret: str, store: CredentialStore, oauth: OAuthClient,
              redis_client: redis.Redis, audit: MemoryAuditSink, clock: FakeClock,
              servers: ServerRegistry | None = None, open_url: str | None = None) -> ConnectFlow:
    states = RedisStateStore(redis_client, Sealer(os.urandom(32)))
    return ConnectFlow(servers or registry(sandbox.url, client_secret), store, oauth, states, audit, clock,
                       CALLBACK_URL, ttl_seconds=600, open_url=open_url)


OPEN_URL = "http://127.0.0.1:18080/v1/connect/open"


@pytest.fixture
def flow(sandbox: SandboxHandle, client_secret: str, store: CredentialStore, oauth: OAuthClient,
         redis_client: redis.Redis, audit: MemoryAuditSink, clock: FakeClock) -> ConnectFlow:
    return make_flow(sandbox, client_secret, store, oauth, redis_client, audit, clock)


@pytest.fixture
def browser_flow(sandbox: SandboxHandle, client_secret: str, store: CredentialStore, oauth: OAuthClient,
                 redis_client: redis.Redis, audit: MemoryAuditSink, clock: FakeClock) -> ConnectFlow:
    """Browser mode: the broker hosts the callback."""
    return make_flow(sandbox, client_secret, store, oauth, redis_client, audit, clock, open_url=OPEN_URL)


def browser(connect_url: str, consent: str = "approve", user: str = "sandbox-user") -> dict[str, str]:
    """The user's browser: open the consent URL, answer, return the redirect's query.

    Plain http.client: httpcore's debug log would print the code from the
    Location header, which the secret guard rightly refuses.
    """
    parts = urlsplit(f"{connect_url}&consent={consent}&user={user}")
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        response.read()
        location = response.getheader("Location") or ""
    finally:
        conn.close()
    assert response.status == 302, response.status
    assert location.startswith(CALLBACK_URL + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    if "code" in query:
        register(query["code"])
    return query


def connect(flow: ConnectFlow, user: str, server: str = "gh") -> ConnectResult:
    query = browser(flow.start(user, server).connect_url, user=f"{user}-upstream")
    return flow.complete(query["state"], query.get("code"), user)


def open_link(flow: ConnectFlow, connect_url: str) -> tuple[str, str, str]:
    """Browser mode: the user's browser opens the broker link: (state, cookie, authorize URL)."""
    assert connect_url.startswith(OPEN_URL + "?")
    state = parse_qs(urlsplit(connect_url).query)["state"][0]
    opened = flow.open(state)
    return state, opened.cookie_value, opened.authorize_url


def token_grants(sandbox: SandboxHandle, grant: str = "authorization_code") -> list[dict[str, Any]]:
    return [r for r in sandbox.provider.requests("token") if r["grant_type"] == grant]


# -- the happy path -----------------------------------------------------------------------------


def test_connect_end_to_end_stores_for_that_user_only(sandbox: SandboxHandle, client_secret: str,
                                                      engine: Engine, oauth: OAuthClient,
                                                      redis_client: redis.Redis, audit: MemoryAuditSink,
                                                      clock: FakeClock) -> None:
    store = CredentialStore(engine, make_keyring("A"), clock=clock)  # SQLite and PostgreSQL
    flow = make_flow(sandbox, client_secret, store, oauth, redis_client, audit, clock)
    server = flow.servers["gh"]

    start = flow.start("alice", "gh")

    assert (start.expires_at - clock.now()).total_seconds() == 600
    parts = urlsplit(start.connect_url)
    params = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{sandbox.url}/authorize"
    assert params["response_type"] == "code" and params["client_id"] == "broker-client"
    assert params["redirect_uri"] == CALLBACK_URL and params["scope"] == "repo"
    assert params["code_challenge_method"] == "S256" and len(params["state"]) >= 43  # >= 256 bits
    # In Redis under a hash of the state, sealed, with the flow's TTL.
    state_key = STATE_PREFIX + hashlib.sha256(params["state"].encode()).hexdigest()
    sealed = redis_client.get(state_key)
    assert sealed is not None and 590 < redis_client.ttl(state_key) <= 600
    assert b"alice" not in sealed and server.key.encode() not in sealed

    query = browser(start.connect_url, user="alice-upstream")
    assert query["state"] == params["state"]
    result = flow.complete(query["state"], query["code"], "alice")

    assert result == ConnectResult("alice", "gh")
    (redeem,) = token_grants(sandbox)
    assert redeem["client_auth"] == "client_secret_post"
    assert redeem["form"]["code"] == query["code"] and redeem["form"]["redirect_uri"] == CALLBACK_URL
    assert s256(redeem["form"]["code_verifier"]) == params["code_challenge"]
    assert redeem["form"]["client_secret"] == client_secret
    stored = store.get("alice", server.key)
    assert stored is not None and stored.status is CredentialStatus.CONNECTED
    cred = stored.credential
    assert cred.obtained_via is ObtainedVia.CONNECT_FLOW and cred.refresh_token is not None
    assert sandbox.provider.decode_token(cred.access_token.reveal())["sub"] == "alice-upstream"
    assert [s.server_key for s in store.list("alice")] == [server.key]
    assert store.get("bob", server.key) is None and store.list("bob") == []
    assert [(e.action, e.outcome, e.user_id) for e in audit.events] == [(Action.CONNECT, Outcome.SUCCESS, "alice")]
    with pytest.raises(InvalidState):  # the state was single use
        flow.complete(query["state"], query["code"], "alice")
    assert len(token_grants(sandbox)) == 1
    assert redis_client.exists(state_key) == 0


def test_resolver_hands_out_connect_url_then_serves_the_connected_credential(
        flow: ConnectFlow, sandbox: SandboxHandle, store: CredentialStore, oauth: OAuthClient,
        audit: MemoryAuditSink, clock: FakeClock) -> None:
    resolver = Resolver(flow.servers, store, oauth, audit, clock,
                        connect_url=lambda user, server: flow.start(user, server).connect_url)

    with pytest.raises(NotConnected) as info:
        resolver.resolve("alice", "gh")
    assert info.value.reason == NotConnected.NEVER_CONNECTED and info.value.connect_url

    query = browser(info.value.connect_url, user="alice-upstream")
    flow.complete(query["state"], query["code"], "alice")
    resolved = resolver.resolve("alice", "gh")

    stored = store.get("alice", flow.servers["gh"].key)
    assert stored is not None
    assert resolved.value.reveal() == f"Bearer {stored.credential.access_token.reveal()}"
    assert resolved.obtained_via == "connect_flow"
    with pytest.raises(NotConnected):
        resolver.resolve("bob", "gh")


def test_public_client_connects_with_pkce_and_no_secret(flow: ConnectFlow, sandbox: SandboxHandle,
                                                        store: CredentialStore) -> None:
    result = connect(flow, "alice", "gh-public")

    assert result == ConnectResult("alice", "gh-public")
    (redeem,) = token_grants(sandbox)
    assert redeem["client_auth"] == "none" and redeem["client_id"] == "public-client"
    assert set(redeem["form"]) == {"grant_type", "code", "redirect_uri", "code_verifier", "client_id"}
    stored = store.get("alice", flow.servers["gh-public"].key)
    assert stored is not None and stored.credential.refresh_token is not None


def test_issuer_only_server_connects_and_disconnects_through_discovery(
        sandbox: SandboxHandle, client_secret: str, store: CredentialStore, oauth: OAuthClient,
        redis_client: redis.Redis, audit: MemoryAuditSink, clock: FakeClock) -> None:
    servers = parse_servers({"servers": [{"name": "gh", "url": "https://gh.upstream.test/mcp", "auth_broker": {
        "mode": "oauth_connect", "issuer": sandbox.url, "client_id": "broker-client",
        "client_secret": client_secret}}]})
    flow = make_flow(sandbox, client_secret, store, oauth, redis_client, audit, clock, servers)

    assert connect(flow, "alice") == ConnectResult("alice", "gh")
    assert flow.disconnect("alice", "gh") is True

    assert sandbox.provider.requests("metadata")
    assert [r["grant_type"] for r in sandbox.provider.requests("token")] == ["authorization_code"]
    assert sandbox.provider.stats()["revocations"] == 2
    assert store.list("alice") == []


def test_start_refuses_a_server_that_does_not_use_the_connect_flow(flow: ConnectFlow) -> None:
    with pytest.raises(InvalidRequest):
        flow.start("alice", "tx")


# -- state: single use, expiry, binding -------------------------------------------------------


def race(n: int, call: Callable[[], object]) -> list[object]:
    """Run ``call`` in ``n`` threads released together; their results or BrokerErrors."""
    barrier = threading.Barrier(n)
    outcomes: list[object] = []

    def run() -> None:
        barrier.wait()
        try:
            outcomes.append(call())
        except BrokerError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return outcomes


def test_two_concurrent_callbacks_with_one_state_exactly_one_wins(flow: ConnectFlow, sandbox: SandboxHandle,
                                                                  store: CredentialStore) -> None:
    for round_ in range(3):
        user = f"user{round_}"
        query = browser(flow.start(user, "gh").connect_url, user=user)

        outcomes = race(2, lambda: flow.complete(query["state"], query["code"], user))  # noqa: B023

        wins = [o for o in outcomes if isinstance(o, ConnectResult)]
        losses = [o for o in outcomes if isinstance(o, BrokerError)]
        assert wins == [ConnectResult(user, "gh")]
        assert [e.code for e in losses] == ["invalid_state"]
        assert store.get(user, flow.servers["gh"].key) is not None
    assert len(token_grants(sandbox)) == 3  # the loser never reached the provider


def test_expired_state_is_refused_and_stores_nothing(flow: ConnectFlow, sandbox: SandboxHandle,
                                                     store: CredentialStore, audit: MemoryAuditSink,
                                                     clock: FakeClock) -> None:
    start = flow.start("alice", "gh")
    query = browser(start.connect_url, user="alice")
    clock.advance(601)

    with pytest.raises(InvalidState) as info:
        flow.complete(query["state"], query["code"], "alice")

    assert "expired" in info.value.message
    assert token_grants(sandbox) == []
    assert store.list("alice") == []
    assert (audit.events[-1].outcome, audit.events[-1].reason) == (Outcome.FAILURE, "expired_state")
    with pytest.raises(InvalidState):  # consumed, even though it had expired
        flow.complete(query["state"], query["code"], "alice")


def test_state_just_inside_its_ttl_still_completes(flow: ConnectFlow, store: CredentialStore,
                                                   clock: FakeClock) -> None:
    query = browser(flow.start("alice", "gh").connect_url, user="alice")
    clock.advance(599)

    assert flow.complete(query["state"], query["code"], "alice") == ConnectResult("alice", "gh")
    assert store.get("alice", flow.servers["gh"].key) is not None


@pytest.mark.parametrize("state", ["", None, "not-a-state-we-issued", "x" * 600])
def test_unknown_or_missing_state_is_refused(flow: ConnectFlow, browser_flow: ConnectFlow, sandbox: SandboxHandle,
                                             store: CredentialStore, audit: MemoryAuditSink,
                                             state: str | None) -> None:
    with pytest.raises(InvalidState) as info:
        flow.complete(state, "sbx_ac_whatever", "alice")
    for step in (lambda: browser_flow.open(state), lambda: browser_flow.callback(state, "sbx_ac_whatever"),
                 lambda: browser_flow.confirm(state, "cookie")):
        with pytest.raises(BrokerError):
            step()

    assert info.value.to_dict()["error"] == "invalid_state" and info.value.http_status == 400
    assert sandbox.provider.requests("token") == []
    assert audit.events == []  # junk from anyone is counted in metrics, not written to the audit table


def test_access_denied_stores_nothing_and_audits_denied(browser_flow: ConnectFlow, sandbox: SandboxHandle,
                                                        store: CredentialStore, audit: MemoryAuditSink) -> None:
    flow = browser_flow
    state, cookie, authorize_url = open_link(flow, flow.start("alice", "gh").connect_url)
    query = browser(authorize_url, consent="deny")
    assert query["error"] == "access_denied" and "code" not in query

    with pytest.raises(ConnectError) as info:
        flow.callback(query["state"], error=query["error"], cookie=cookie)

    assert info.value.reason == "access_denied"
    assert sandbox.provider.requests("token") == []
    assert store.list("alice") == []
    (event,) = audit.events
    assert (event.action, event.outcome, event.user_id, event.reason) == (
        Action.CONNECT, Outcome.DENIED, "alice", "access_denied")
    with pytest.raises(InvalidState):  # the state was cleared
        flow.callback(query["state"], code="sbx_ac_late", cookie=cookie)


def test_gateway_mode_refuses_a_foreign_users_completion_and_burns_the_state(
        flow: ConnectFlow, sandbox: SandboxHandle, store: CredentialStore, audit: MemoryAuditSink) -> None:
    # Alice asks for a link and has Bob open it; Bob consents; Bob's gateway session completes.
    query = browser(flow.start("alice", "gh").connect_url, user="bob-upstream")

    with pytest.raises(ConnectUserMismatch) as info:
        flow.complete(query["state"], query["code"], "bob")

    assert info.value.to_dict()["error"] == "connect_user_mismatch" and info.value.http_status == 403
    assert token_grants(sandbox) == []  # the code was never redeemed
    assert store.list("alice") == [] and store.list("bob") == []
    with pytest.raises(InvalidState):  # burned: not even Alice can use it now
        flow.complete(query["state"], query["code"], "alice")
    assert store.list("alice") == []
    assert [(e.outcome, e.user_id, e.reason) for e in audit.events] == [(Outcome.DENIED, "alice", "user_mismatch")]


def test_browser_mode_completes_only_in_the_browser_that_opened_the_link_after_a_confirming_click(
        browser_flow: ConnectFlow, sandbox: SandboxHandle, store: CredentialStore, redis_client: redis.Redis,
        audit: MemoryAuditSink) -> None:
    flow = browser_flow
    start = flow.start("alice@example.com", "gh")
    assert start.connect_url.startswith(OPEN_URL + "?state=")
    state, cookie, authorize_url = open_link(flow, start.connect_url)
    assert authorize_url.startswith(sandbox.url + "/authorize?") and f"state={state}" in authorize_url
    with pytest.raises(ConnectError) as twice:  # a link binds one browser only
        flow.open(state)
    assert twice.value.reason == "link_used"
    query = browser(authorize_url, user="alice-upstream")

    prompt = flow.callback(query["state"], code=query["code"], cookie=cookie)

    assert prompt == ConfirmPrompt("gh", "a***e@example.com")
    assert token_grants(sandbox) == [] and store.list("alice@example.com") == []  # nothing before the click
    # A cross-site POST (no cookie, or another one) neither completes nor burns the link.
    for wrong in (None, "forged-cookie"):
        with pytest.raises(ConnectError) as refused:
            flow.confirm(state, wrong)
        assert refused.value.reason == "browser_mismatch"
    assert flow.confirm(state, cookie) == ConnectResult("alice@example.com", "gh")
    assert len(token_grants(sandbox)) == 1
    assert store.get("alice@example.com", flow.servers["gh"].key) is not None
    with pytest.raises(BrokerError):  # single use
        flow.confirm(state, cookie)
    assert len(token_grants(sandbox)) == 1


def test_browser_mode_refuses_a_foreign_browser_and_stores_nothing(
        browser_flow: ConnectFlow, sandbox: SandboxHandle, store: CredentialStore, audit: MemoryAuditSink) -> None:
    flow = browser_flow
    # Alice opens her link (her browser gets the cookie) and forwards the authorization URL to Bob.
    state, alice_cookie, authorize_url = open_link(flow, flow.start("alice", "gh").connect_url)
    query = browser(authorize_url, user="bob-upstream")

    with pytest.raises(ConnectError) as info:  # Bob's browser has no cookie for this link
        flow.callback(query["state"], code=query["code"], cookie=None)

    assert info.value.reason == "browser_mismatch"
    assert token_grants(sandbox) == []
    assert store.list("alice") == [] and store.list("bob") == []
    with pytest.raises(InvalidState):  # the state is burned
        flow.callback(query["state"], code=query["code"], cookie=alice_cookie)
    assert (audit.events[-1].outcome, audit.events[-1].reason) == (Outcome.DENIED, "browser_mismatch")


def test_a_code_from_one_flow_does_not_complete_another_users_state(flow: ConnectFlow, sandbox: SandboxHandle,
                                                                    store: CredentialStore) -> None:
    alice = browser(flow.start("alice", "gh").connect_url, user="alice")
    bob = browser(flow.start("bob", "gh").connect_url, user="bob")

    # Bob's state with Alice's code: Bob's PKCE verifier does not match Alice's challenge.
    with pytest.raises(UpstreamError) as info:
        flow.complete(bob["state"], alice["code"], "bob")

    assert info.value.oauth_error == "invalid_grant"
    assert sandbox.provider.stats()["errors"].get("invalid_grant") == 1
    assert store.list("bob") == [] and store.list("alice") == []
    # The code was burnt by the failed attempt (single use at the provider): Alice must start again.
    with pytest.raises(UpstreamError):
        flow.complete(alice["state"], alice["code"], "alice")
    assert store.list("alice") == []


def test_callback_after_the_server_url_changed_is_refused(flow: ConnectFlow, sandbox: SandboxHandle,
                                                          client_secret: str, store: CredentialStore,
                                                          oauth: OAuthClient, audit: MemoryAuditSink,
                                                          clock: FakeClock) -> None:
    query = browser(flow.start("alice", "gh").connect_url, user="alice")
    moved = ConnectFlow(registry(sandbox.url, client_secret, gh_url="https://moved.upstream.test/mcp"), store,
                        oauth, flow.states, audit, clock, CALLBACK_URL)

    with pytest.raises(ConnectError) as info:
        moved.complete(query["state"], query["code"], "alice")

    assert info.value.reason == "server_changed"
    assert sandbox.provider.requests("token") == [] and store.list("alice") == []


# -- disconnect -------------------------------------------------------------------------------


def test_disconnect_revokes_upstream_and_deletes_locally(flow: ConnectFlow, sandbox: SandboxHandle,
                                                         client_secret: str, store: CredentialStore,
                                                         oauth: OAuthClient, audit: MemoryAuditSink) -> None:
    connect(flow, "alice")
    connect(flow, "bob")
    server = flow.servers["gh"]
    stored = store.get("alice", server.key)
    assert stored is not None
    cred = stored.credential

    assert flow.disconnect("alice", "gh") is True

    revokes = sandbox.provider.requests("revoke")
    assert [r["form"]["token_type_hint"] for r in revokes] == ["refresh_token", "access_token"]
    assert revokes[0]["form"]["token"] == cred.refresh_token.reveal()  # type: ignore[union-attr]
    assert revokes[1]["form"]["token"] == cred.access_token.reveal()
    assert all(r["client_auth"] == "client_secret_post" and r["form"]["client_secret"] == client_secret
               for r in revokes)
    assert sandbox.provider.stats()["revocations"] == 2
    with pytest.raises(UpstreamError) as info:  # the revoked refresh token is dead at the provider
        oauth.refresh(server, cred)
    assert info.value.oauth_error == "invalid_grant"
    assert store.get("alice", server.key) is None and store.list("alice") == []
    assert store.get("bob", server.key) is not None  # another user's connection is untouched
    assert [(e.action, e.outcome) for e in audit.events if e.user_id == "alice"][-2:] == [
        (Action.REVOKE, Outcome.SUCCESS), (Action.DISCONNECT, Outcome.SUCCESS)]
    assert flow.disconnect("alice", "gh") is False  # nothing left; nothing more to revoke
    assert len(sandbox.provider.requests("revoke")) == 2


def test_failed_revocation_is_audited_and_the_local_delete_still_happens(
        flow: ConnectFlow, sandbox: SandboxHandle, store: CredentialStore, oauth: OAuthClient,
        audit: MemoryAuditSink) -> None:
    connect(flow, "alice")
    server = flow.servers["gh"]
    stored = store.get("alice", server.key)
    assert stored is not None
    sandbox.provider.set_fault("revoke", "5xx")

    assert flow.disconnect("alice", "gh") is True

    assert store.get("alice", server.key) is None
    assert sandbox.provider.stats()["revocations"] == 0
    assert len(sandbox.provider.requests("revoke")) == 4  # 2 tokens x 2 attempts each
    revoke_events = [e for e in audit.events if e.action is Action.REVOKE]
    assert [(e.outcome, e.reason) for e in revoke_events] == [(Outcome.FAILURE, "temporarily_unavailable")]
    assert audit.events[-1].action is Action.DISCONNECT and audit.events[-1].outcome is Outcome.SUCCESS
    # Not revoked upstream, so the refresh token would still work: that is what the failure audit is for.
    sandbox.provider.set_fault("revoke", None)
    assert oauth.refresh(server, stored.credential).access_token != stored.credential.access_token


def test_a_double_click_on_confirm_stores_once(browser_flow: ConnectFlow, sandbox: SandboxHandle,
                                               store: CredentialStore) -> None:
    flow = browser_flow
    for round_ in range(3):
        user = f"clicker{round_}"
        state, cookie, authorize_url = open_link(flow, flow.start(user, "gh").connect_url)
        query = browser(authorize_url, user=user)
        flow.callback(query["state"], code=query["code"], cookie=cookie)

        outcomes = race(2, lambda: flow.confirm(state, cookie))  # noqa: B023

        assert [o for o in outcomes if isinstance(o, ConnectResult)] == [ConnectResult(user, "gh")]
        assert store.get(user, flow.servers["gh"].key) is not None
    assert len(token_grants(sandbox)) == 3  # one redemption per flow
