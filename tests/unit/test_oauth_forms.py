"""Request builders: exact form fields, client authentication, redaction."""

from __future__ import annotations

import base64
from dataclasses import replace
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

import pytest

from broker.errors import ConfigError
from broker.oauth import forms
from broker.oauth.forms import (
    ACCESS_TOKEN_TYPE,
    GRANT_JWT_BEARER,
    GRANT_TOKEN_EXCHANGE,
    TokenRequest,
    authorization_code_request,
    authorize_url,
    obo_request,
    refresh_request,
    revocation_request,
    token_exchange_request,
)
from broker.secret import Secret
from broker.servers import AuthBrokerConfig, ClientAuth, Mode, RefreshScope

TOKEN_URL = "https://as.example/oauth/token"
SUBJECT = Secret("subject-token-value")
CLIENT_SECRET = "client-secret-value"


def cfg(**changes: object) -> AuthBrokerConfig:
    base = AuthBrokerConfig(
        mode=Mode.TOKEN_EXCHANGE,
        token_endpoint=TOKEN_URL,
        authorization_endpoint="https://as.example/authorize",
        revocation_endpoint="https://as.example/revoke",
        client_id="broker-client",
        client_secret=Secret(CLIENT_SECRET),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def decode_basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(value).decode().partition(":")
    return user, password


def test_token_exchange_minimal_form() -> None:
    req = token_exchange_request(cfg(), SUBJECT)
    assert req.url == TOKEN_URL
    assert req.form == {
        "grant_type": GRANT_TOKEN_EXCHANGE,
        "subject_token": "subject-token-value",
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "requested_token_type": ACCESS_TOKEN_TYPE,
        "client_id": "broker-client",
        "client_secret": CLIENT_SECRET,
    }
    assert req.headers == {}
    assert req.grant == "token_exchange"


def test_token_exchange_with_resource_audience_and_scopes() -> None:
    req = token_exchange_request(
        cfg(resource="https://api.example/", audience="api", scopes=("read", "write"),
            requested_token_type="urn:ietf:params:oauth:token-type:jwt"),
        SUBJECT,
    )
    assert req.form["resource"] == "https://api.example/"
    assert req.form["audience"] == "api"
    assert req.form["scope"] == "read write"
    assert req.form["requested_token_type"] == "urn:ietf:params:oauth:token-type:jwt"


def test_obo_form() -> None:
    req = obo_request(cfg(mode=Mode.ENTRA_OBO, scopes=("api://x/.default",)), SUBJECT)
    assert req.form == {
        "grant_type": GRANT_JWT_BEARER,
        "assertion": "subject-token-value",
        "requested_token_use": "on_behalf_of",
        "scope": "api://x/.default",
        "client_id": "broker-client",
        "client_secret": CLIENT_SECRET,
    }
    assert req.grant == "entra_obo"


def test_authorization_code_form() -> None:
    req = authorization_code_request(
        cfg(mode=Mode.OAUTH_CONNECT, resource="https://api.example/"), "the-code", "the-verifier",
        "https://broker.example/v1/connect/callback",
    )
    assert req.form == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "redirect_uri": "https://broker.example/v1/connect/callback",
        "code_verifier": "the-verifier",
        "resource": "https://api.example/",
        "client_id": "broker-client",
        "client_secret": CLIENT_SECRET,
    }


def test_refresh_form_omits_scope_unless_configured() -> None:
    req = refresh_request(cfg(mode=Mode.OAUTH_CONNECT), Secret("rt-1"))
    assert req.form == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-1",
        "client_id": "broker-client",
        "client_secret": CLIENT_SECRET,
    }
    # Configured scopes alone do not put scope on the refresh (RFC 6749 section 6):
    # the grant keeps its original scope, and strict servers answer invalid_scope.
    configured = refresh_request(cfg(mode=Mode.OAUTH_CONNECT, scopes=("a", "b")), Secret("rt-1"))
    assert "scope" not in configured.form
    scoped = refresh_request(
        cfg(mode=Mode.OAUTH_CONNECT, scopes=("a", "b"), refresh_scope=RefreshScope.CONFIGURED), Secret("rt-1"))
    assert scoped.form["scope"] == "a b"


def test_revocation_form_and_url() -> None:
    req = revocation_request(cfg(), Secret("rt-1"), "refresh_token")
    assert req.url == "https://as.example/revoke"
    assert req.form == {
        "token": "rt-1",
        "token_type_hint": "refresh_token",
        "client_id": "broker-client",
        "client_secret": CLIENT_SECRET,
    }
    assert req.grant == "revocation"
    assert "token_type_hint" not in revocation_request(cfg(), Secret("t")).form


def test_revocation_without_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="revocation_endpoint"):
        revocation_request(cfg(revocation_endpoint=None), Secret("t"))


def test_missing_token_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="token_endpoint"):
        token_exchange_request(cfg(token_endpoint=None), SUBJECT)


def test_client_secret_basic_puts_credentials_in_header_only() -> None:
    req = token_exchange_request(cfg(client_auth=ClientAuth.CLIENT_SECRET_BASIC), SUBJECT)
    assert decode_basic(req.headers["Authorization"]) == ("broker-client", CLIENT_SECRET)
    assert "client_id" not in req.form
    assert "client_secret" not in req.form


def test_client_secret_basic_form_urlencodes_both_parts() -> None:
    req = refresh_request(
        cfg(client_id="id:with space", client_secret=Secret("p@ss:w+rd/%é"),
            client_auth=ClientAuth.CLIENT_SECRET_BASIC),
        Secret("rt"),
    )
    user, password = decode_basic(req.headers["Authorization"])
    assert ":" not in user and " " not in user and "+" not in password
    # Servers decode with form decoding or plain percent decoding: both work.
    for decode in (unquote, unquote_plus):
        assert decode(user) == "id:with space"
        assert decode(password) == "p@ss:w+rd/%é"


def test_public_client_sends_client_id_only() -> None:
    for auth in (ClientAuth.CLIENT_SECRET_POST, ClientAuth.CLIENT_SECRET_BASIC):
        req = authorization_code_request(
            cfg(client_secret=None, client_auth=auth), "c", "v", "https://b.example/cb"
        )
        assert req.form["client_id"] == "broker-client"
        assert "client_secret" not in req.form
        assert req.headers == {}


def test_no_client_id_sends_no_client_authentication() -> None:
    req = token_exchange_request(cfg(client_id=None, client_secret=None), SUBJECT)
    assert "client_id" not in req.form and req.headers == {}


def test_secret_without_client_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="client_id"):
        token_exchange_request(cfg(client_id=None), SUBJECT)


def test_authorize_url_parameters() -> None:
    url = authorize_url(
        cfg(mode=Mode.OAUTH_CONNECT, scopes=("openid", "repo"), resource="https://api.example/"),
        "st", "ch", "https://broker.example/v1/connect/callback",
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "as.example", "/authorize")
    assert parse_qs(parts.query) == {
        "response_type": ["code"],
        "client_id": ["broker-client"],
        "redirect_uri": ["https://broker.example/v1/connect/callback"],
        "state": ["st"],
        "code_challenge": ["ch"],
        "code_challenge_method": ["S256"],
        "scope": ["openid repo"],
        "resource": ["https://api.example/"],
    }
    assert CLIENT_SECRET not in url


def test_authorize_url_keeps_existing_query_and_omits_unset_fields() -> None:
    url = authorize_url(
        cfg(mode=Mode.OAUTH_CONNECT, authorization_endpoint="https://as.example/authorize?p=b2c_1"),
        "st", "ch", "https://b.example/cb",
    )
    query = parse_qs(urlsplit(url).query)
    assert query["p"] == ["b2c_1"]
    assert "scope" not in query and "resource" not in query


def test_authorize_url_needs_an_endpoint() -> None:
    with pytest.raises(ConfigError, match="authorization_endpoint"):
        authorize_url(cfg(authorization_endpoint=None), "s", "c", "https://b.example/cb")


def test_token_request_repr_is_redacted() -> None:
    req = token_exchange_request(cfg(client_auth=ClientAuth.CLIENT_SECRET_BASIC), SUBJECT)
    req = TokenRequest(url="https://user:pw@as.example/token?x=1", form=req.form, headers=req.headers)
    for text in (repr(req), str(req), f"{req}"):
        assert "subject-token-value" not in text
        assert CLIENT_SECRET not in text
        assert req.headers["Authorization"].split()[1] not in text
        assert "pw" not in text and "x=1" not in text
        assert "subject_token" in text  # field names are fine


def test_token_request_is_frozen() -> None:
    req = token_exchange_request(cfg(), SUBJECT)
    with pytest.raises(AttributeError):
        req.url = "https://evil.example/"  # type: ignore[misc]


def test_exports() -> None:
    for name in forms.__all__:
        assert hasattr(forms, name)
