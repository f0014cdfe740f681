"""Token lifetime when the response has no ``expires_in``: the JWT's own ``exp``,
else the server's ``default_lifetime_seconds``, else no expiry with one
warning per server; and a refresh answer without ``refresh_token`` keeps the old one."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from broker.clock import FakeClock
from broker.models import Credential, ObtainedVia
from broker.oauth import MetadataCache, OAuthClient, TokenEndpointSender
from broker.oauth.responses import parse_token_response
from broker.secret import Secret
from broker.servers import ServerRegistry, parse_servers

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def jwt_with_exp(exp: datetime) -> str:
    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{seg({'alg': 'none'})}.{seg({'exp': int(exp.timestamp())})}.sig"


def parse(body: dict[str, Any], default_lifetime: int | None) -> Credential:
    return parse_token_response(200, {}, json.dumps(body).encode(), obtained_via=ObtainedVia.CONNECT_FLOW,
                                now=NOW, default_lifetime=default_lifetime)


def test_opaque_token_without_expires_in_uses_the_default_lifetime() -> None:
    cred = parse({"access_token": "opaque-token", "token_type": "Bearer"}, 7200)
    assert cred.expires_at == NOW + timedelta(seconds=7200)


def test_expires_in_wins_over_the_default() -> None:
    assert parse({"access_token": "opaque-token", "expires_in": 60}, 7200).expires_at == NOW + timedelta(seconds=60)


def test_the_tokens_own_exp_wins_over_the_default() -> None:
    exp = NOW + timedelta(seconds=900)
    assert parse({"access_token": jwt_with_exp(exp)}, 7200).expires_at == exp


def test_without_default_the_expiry_stays_unknown() -> None:
    assert parse({"access_token": "opaque-token"}, None).expires_at is None


class Replies:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=self.body)


@pytest.fixture
def replies() -> Replies:
    return Replies({"access_token": "opaque-token", "token_type": "Bearer"})


@pytest.fixture
def oauth(replies: Replies) -> Iterator[OAuthClient]:
    http = httpx.Client(transport=httpx.MockTransport(replies))
    yield OAuthClient(TokenEndpointSender(http, retry_seconds=1, max_attempts=1), MetadataCache(), FakeClock(NOW))
    http.close()


def servers(**extra: Any) -> ServerRegistry:
    def entry(name: str, **auth: Any) -> dict[str, Any]:
        return {"name": name, "url": f"https://{name}.example/mcp",
                "auth_broker": {"mode": "oauth_connect", "token_endpoint": "https://as.example/token",
                                "authorization_endpoint": "https://as.example/authorize", "client_id": "c", **auth}}
    return parse_servers({"servers": [entry("a", **extra), entry("b")]})


def credential() -> Credential:
    return Credential(access_token=Secret("old-access"), obtained_via=ObtainedVia.CONNECT_FLOW, token_type="Bearer",
                      expires_at=NOW, issued_at=NOW - timedelta(hours=1), refresh_token=Secret("old-refresh"))


def test_client_applies_the_servers_default_lifetime(oauth: OAuthClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.oauth.client")
    renewed = oauth.refresh(servers(default_lifetime_seconds=3600)["a"], credential())
    assert renewed.expires_at == NOW + timedelta(seconds=3600)
    assert not [r for r in caplog.records if "default_lifetime_seconds" in r.getMessage()]


def test_no_expiry_is_warned_once_per_server(oauth: OAuthClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.oauth.client")
    registry = servers()
    for _ in range(3):
        assert oauth.refresh(registry["a"], credential()).expires_at is None
    oauth.refresh(registry["b"], credential())
    warnings = [r.getMessage() for r in caplog.records if "default_lifetime_seconds" in r.getMessage()]
    assert len(warnings) == 2
    assert "server=a:" in warnings[0] and "server=b:" in warnings[1]


def test_refresh_answer_without_refresh_token_keeps_the_old_one(oauth: OAuthClient) -> None:
    renewed = oauth.refresh(servers(default_lifetime_seconds=3600)["a"], credential())
    assert renewed.access_token.reveal() == "opaque-token"
    assert renewed.refresh_token is not None and renewed.refresh_token.reveal() == "old-refresh"
