"""OAuthClient end to end over httpx.MockTransport: mint, redeem, refresh, revoke."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest

import broker.oauth as oauth
from broker.clock import FakeClock
from broker.errors import ConfigError, NotConnected, UpstreamError
from broker.models import Credential, ObtainedVia
from broker.oauth import MetadataCache, OAuthClient, TokenEndpointSender, call_result, s256_challenge
from broker.oauth.forms import GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE
from broker.secret import Secret
from broker.servers import AuthBrokerConfig, Mode, ServerConfig

TOKEN_URL = "https://as.example/token"
REVOKE_URL = "https://as.example/revoke"
SUBJECT = "subject-SECRET-token"
CLIENT_SECRET = "client-SECRET-value"
FAKE_SECRET = "sk-live-DESCRIPTION-SECRET"


class FakeAS:
    """A scripted authorization server: routes by path, records requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.token_replies: list[tuple[int, dict[str, Any]]] = []
        self.revoke_replies: list[tuple[int, dict[str, Any]]] = []
        self.metadata: dict[str, Any] | None = None

    def forms(self, path: str = "/token") -> list[dict[str, str]]:
        return [dict(parse_qsl(r.content.decode())) for r in self.requests if r.url.path == path]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.startswith("/.well-known/"):
            if self.metadata is None or "oauth-authorization-server" not in request.url.path:
                return httpx.Response(404)
            return httpx.Response(200, json=self.metadata)
        replies = self.revoke_replies if request.url.path == "/revoke" else self.token_replies
        status, body = replies.pop(0) if len(replies) > 1 else replies[0]
        return httpx.Response(status, json=body)


@pytest.fixture
def fake_as() -> FakeAS:
    return FakeAS()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def calls() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def client(fake_as: FakeAS, clock: FakeClock, calls: list[tuple[str, str]]) -> Iterator[OAuthClient]:
    http = httpx.Client(transport=httpx.MockTransport(fake_as))
    sender = TokenEndpointSender(
        http, retry_seconds=10, max_attempts=3, sleep=lambda s: None, rand=lambda: 0.0
    )
    yield OAuthClient(
        sender, MetadataCache(clock=clock), clock, on_call=lambda g, r: calls.append((g, r))
    )
    http.close()


def server(mode: Mode = Mode.TOKEN_EXCHANGE, **kw: Any) -> ServerConfig:
    kw.setdefault("token_endpoint", TOKEN_URL)
    kw.setdefault("client_id", "broker")
    kw.setdefault("client_secret", Secret(CLIENT_SECRET))
    return ServerConfig(name="github", url="https://api.example/mcp", auth_broker=AuthBrokerConfig(mode=mode, **kw))


def connected(**kw: Any) -> Credential:
    kw.setdefault("refresh_token", Secret("rt-old"))
    return Credential(
        access_token=Secret("at-old"), obtained_via=ObtainedVia.CONNECT_FLOW,
        scopes=("repo",), audience="https://api.example/", **kw,
    )


def test_mint_token_exchange(client: OAuthClient, fake_as: FakeAS, clock: FakeClock,
                             calls: list[tuple[str, str]]) -> None:
    fake_as.token_replies = [(200, {"access_token": "at-1", "expires_in": 300, "token_type": "bearer"})]
    cred = client.mint(
        server(resource="https://api.example/", scopes=("read",)), Secret(SUBJECT)
    )
    (form,) = fake_as.forms()
    assert form["grant_type"] == GRANT_TOKEN_EXCHANGE and form["subject_token"] == SUBJECT
    assert form["resource"] == "https://api.example/" and form["scope"] == "read"
    assert cred.access_token.reveal() == "at-1" and cred.token_type == "Bearer"
    assert cred.obtained_via is ObtainedVia.TOKEN_EXCHANGE
    assert cred.expires_at == clock.now() + timedelta(seconds=300)
    assert cred.audience == "https://api.example/"  # resource when no audience
    assert cred.scopes == ("read",)
    assert calls == [("token_exchange", "success")]


def test_mint_prefers_audience_over_resource(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.token_replies = [(200, {"access_token": "at-1"})]
    cred = client.mint(server(resource="https://api.example/", audience="api"), Secret(SUBJECT))
    assert cred.audience == "api"


def test_mint_entra_obo(client: OAuthClient, fake_as: FakeAS, calls: list[tuple[str, str]]) -> None:
    fake_as.token_replies = [(200, {"access_token": "at-obo", "refresh_token": "rt-obo"})]
    cred = client.mint(server(Mode.ENTRA_OBO, scopes=("api://x/.default",)), Secret(SUBJECT))
    (form,) = fake_as.forms()
    assert form["grant_type"] == GRANT_JWT_BEARER and form["assertion"] == SUBJECT
    assert form["requested_token_use"] == "on_behalf_of"
    assert cred.obtained_via is ObtainedVia.ENTRA_OBO
    assert calls == [("entra_obo", "success")]


def test_mint_refuses_oauth_connect(client: OAuthClient, fake_as: FakeAS) -> None:
    with pytest.raises(ConfigError):
        client.mint(server(Mode.OAUTH_CONNECT), Secret(SUBJECT))
    assert fake_as.requests == []


def test_redeem_code(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.token_replies = [(200, {"access_token": "at-c", "refresh_token": "rt-c", "scope": "repo user"})]
    cred = client.redeem_code(server(Mode.OAUTH_CONNECT), "code-1", "v" * 43, "https://b.example/cb")
    (form,) = fake_as.forms()
    assert (form["grant_type"], form["code"], form["code_verifier"], form["redirect_uri"]) == (
        "authorization_code", "code-1", "v" * 43, "https://b.example/cb",
    )
    assert cred.obtained_via is ObtainedVia.CONNECT_FLOW
    assert cred.refresh_token == Secret("rt-c") and cred.scopes == ("repo", "user")


def test_refresh_keeps_the_old_refresh_token_when_none_is_returned(
    client: OAuthClient, fake_as: FakeAS, calls: list[tuple[str, str]]
) -> None:
    fake_as.token_replies = [(200, {"access_token": "at-new", "expires_in": 60})]
    cred = client.refresh(server(Mode.OAUTH_CONNECT), connected())
    (form,) = fake_as.forms()
    assert form == {"grant_type": "refresh_token", "refresh_token": "rt-old",
                    "client_id": "broker", "client_secret": CLIENT_SECRET}
    assert cred.access_token.reveal() == "at-new"
    assert cred.refresh_token == Secret("rt-old")
    assert cred.obtained_via is ObtainedVia.CONNECT_FLOW
    assert cred.scopes == ("repo",) and cred.audience == "https://api.example/"
    assert calls == [("refresh_token", "success")]


def test_refresh_uses_a_rotated_refresh_token(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.token_replies = [(200, {"access_token": "at-new", "refresh_token": "rt-new"})]
    cred = client.refresh(server(Mode.OAUTH_CONNECT), connected())
    assert cred.refresh_token == Secret("rt-new")


def test_refresh_keeps_obtained_via(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.token_replies = [(200, {"access_token": "at-new"})]
    old = connected().with_changes(obtained_via=ObtainedVia.TOKEN_EXCHANGE)
    assert client.refresh(server(), old).obtained_via is ObtainedVia.TOKEN_EXCHANGE


def test_retry_false_makes_one_attempt(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.token_replies = [(503, {"error": "temporarily_unavailable"})]
    with pytest.raises(UpstreamError):
        client.refresh(server(Mode.OAUTH_CONNECT), connected(), retry=False)
    with pytest.raises(UpstreamError):
        client.mint(server(), Secret(SUBJECT), retry=False)
    assert len(fake_as.forms()) == 2
    with pytest.raises(UpstreamError):
        client.refresh(server(Mode.OAUTH_CONNECT), connected())  # default: the sender's retries
    assert len(fake_as.forms()) == 2 + 3


def test_refresh_without_refresh_token_needs_reconnect(client: OAuthClient, fake_as: FakeAS) -> None:
    with pytest.raises(NotConnected) as info:
        client.refresh(server(Mode.OAUTH_CONNECT), connected(refresh_token=None))
    assert info.value.reason == NotConnected.RECONNECT_REQUIRED
    assert fake_as.requests == []


def test_refresh_invalid_grant_is_final_and_secret_free(
    client: OAuthClient, fake_as: FakeAS, calls: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    fake_as.token_replies = [(400, {"error": "invalid_grant", "error_description": f"token {FAKE_SECRET} revoked"})]
    with caplog.at_level(logging.DEBUG), pytest.raises(UpstreamError) as info:
        client.refresh(server(Mode.OAUTH_CONNECT), connected())
    err = info.value
    assert (err.status, err.oauth_error, err.retryable) == (400, "invalid_grant", False)
    assert len(fake_as.requests) == 1
    assert calls == [("refresh_token", "invalid_grant")]
    assert "oauth_error=invalid_grant" in caplog.text
    for text in (str(err), repr(err), repr(err.to_dict()), caplog.text):
        for secret in (FAKE_SECRET, "rt-old", CLIENT_SECRET):
            assert secret not in text


def test_mint_failure_is_secret_free(
    client: OAuthClient, fake_as: FakeAS, calls: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    fake_as.token_replies = [(401, {"error": "weird_vendor_code", "error_description": FAKE_SECRET})]
    with caplog.at_level(logging.DEBUG), pytest.raises(UpstreamError) as info:
        client.mint(server(), Secret(SUBJECT))
    assert info.value.oauth_error is None
    assert calls == [("token_exchange", "http_4xx")]
    for text in (str(info.value), repr(info.value), repr(info.value.to_dict()), caplog.text):
        for secret in (FAKE_SECRET, SUBJECT, CLIENT_SECRET):
            assert secret not in text


def test_malformed_success_is_reported(client: OAuthClient, fake_as: FakeAS,
                                       calls: list[tuple[str, str]]) -> None:
    fake_as.token_replies = [(200, {"token": "x"})]
    with pytest.raises(UpstreamError, match="without access_token"):
        client.mint(server(), Secret(SUBJECT))
    assert calls == [("token_exchange", "http_2xx")]


def test_transient_failures_are_retried(client: OAuthClient, fake_as: FakeAS,
                                        calls: list[tuple[str, str]]) -> None:
    fake_as.token_replies = [(503, {}), (200, {"access_token": "at"})]
    client.mint(server(), Secret(SUBJECT))
    assert len(fake_as.requests) == 2
    assert calls == [("token_exchange", "success")]  # one call, however many attempts


def test_revoke_refresh_then_access_token(client: OAuthClient, fake_as: FakeAS,
                                          calls: list[tuple[str, str]]) -> None:
    fake_as.revoke_replies = [(200, {})]
    assert client.revoke(server(Mode.OAUTH_CONNECT, revocation_endpoint=REVOKE_URL), connected()) is True
    forms = fake_as.forms("/revoke")
    assert [(f["token"], f["token_type_hint"]) for f in forms] == [
        ("rt-old", "refresh_token"), ("at-old", "access_token"),
    ]
    assert all(f["client_secret"] == CLIENT_SECRET for f in forms)
    assert calls == [("revocation", "success"), ("revocation", "success")]


def test_revoke_without_endpoint_is_a_no_op(client: OAuthClient, fake_as: FakeAS) -> None:
    assert client.revoke(server(Mode.OAUTH_CONNECT), connected()) is False
    assert fake_as.requests == []


def test_revoke_ignores_unsupported_token_type(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.revoke_replies = [(200, {}), (400, {"error": "unsupported_token_type"})]
    assert client.revoke(server(Mode.OAUTH_CONNECT, revocation_endpoint=REVOKE_URL), connected()) is True
    fake_as.revoke_replies = [(400, {"error": "unsupported_token_type"})]
    assert client.revoke(server(Mode.OAUTH_CONNECT, revocation_endpoint=REVOKE_URL), connected()) is False


def test_revoke_failure_raises_after_trying_both(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.revoke_replies = [(401, {"error": "invalid_client"}), (200, {})]
    with pytest.raises(UpstreamError) as info:
        client.revoke(server(Mode.OAUTH_CONNECT, revocation_endpoint=REVOKE_URL), connected())
    assert info.value.oauth_error == "invalid_client"
    assert len(fake_as.forms("/revoke")) == 2


def test_revoke_discovers_the_revocation_endpoint(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.metadata = {"issuer": "https://as.example", "token_endpoint": TOKEN_URL,
                        "revocation_endpoint": REVOKE_URL}
    fake_as.revoke_replies = [(200, {})]
    srv = server(Mode.OAUTH_CONNECT, issuer="https://as.example",
                 authorization_endpoint="https://as.example/authorize")
    assert client.revoke(srv, connected(refresh_token=None)) is True
    assert len(fake_as.forms("/revoke")) == 1


def test_authorize_url_uses_the_verifier_challenge(client: OAuthClient) -> None:
    verifier = oauth.new_verifier()
    url = client.authorize_url(
        server(Mode.OAUTH_CONNECT, authorization_endpoint="https://as.example/authorize", scopes=("repo",)),
        "state-1", verifier, "https://b.example/cb",
    )
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge"] == [s256_challenge(verifier)]
    assert query["state"] == ["state-1"] and query["scope"] == ["repo"]
    assert verifier not in url


def test_discovery_then_cached(client: OAuthClient, fake_as: FakeAS, clock: FakeClock) -> None:
    fake_as.metadata = {"issuer": "https://as.example", "token_endpoint": TOKEN_URL}
    fake_as.token_replies = [(200, {"access_token": "at"})]
    srv = server(issuer="https://as.example", token_endpoint=None)
    client.mint(srv, Secret(SUBJECT))
    client.mint(srv, Secret(SUBJECT))
    paths = [r.url.path for r in fake_as.requests]
    assert paths == ["/.well-known/oauth-authorization-server", "/token", "/token"]


def test_discovery_issuer_mismatch_stops_the_mint(client: OAuthClient, fake_as: FakeAS) -> None:
    fake_as.metadata = {"issuer": "https://evil.example", "token_endpoint": "https://evil.example/token"}
    with pytest.raises(UpstreamError, match="issuer"):
        client.mint(server(issuer="https://as.example", token_endpoint=None), Secret(SUBJECT))
    assert all(r.url.path != "/token" for r in fake_as.requests)


def test_a_failing_on_call_hook_never_breaks_a_mint(fake_as: FakeAS, clock: FakeClock) -> None:
    def broken(grant: str, result: str) -> None:
        raise RuntimeError("metrics down")

    fake_as.token_replies = [(200, {"access_token": "at"})]
    sender = TokenEndpointSender(httpx.Client(transport=httpx.MockTransport(fake_as)),
                                 retry_seconds=1, max_attempts=1)
    assert OAuthClient(sender, None, clock, on_call=broken).mint(server(), Secret(SUBJECT)).access_token


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (None, "success"),
        (UpstreamError(status=400, oauth_error="invalid_grant"), "invalid_grant"),
        (UpstreamError(status=None, retryable=True), "network"),
        (UpstreamError(status=503), "http_5xx"),
        (UpstreamError(status=404, oauth_error="not_a_code"), "http_4xx"),
    ],
)
def test_call_result_labels_are_bounded(error: UpstreamError | None, label: str) -> None:
    assert call_result(error) == label


def test_package_exports() -> None:
    for name in oauth.__all__:
        assert hasattr(oauth, name), name
    assert set(oauth.__all__) >= {"OAuthClient", "TokenEndpointSender", "MetadataCache", "TokenRequest"}
