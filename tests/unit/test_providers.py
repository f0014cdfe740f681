"""Provider profiles: what each fills, explicit keys overriding, template
parameters and their errors, authorize-URL extras, and response adapters."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.errors import ConfigError, UpstreamError
from broker.models import ObtainedVia
from broker.oauth.forms import authorize_url
from broker.oauth.responses import parse_token_response
from broker.providers import PROFILES, response_adapter
from broker.servers import AuthBrokerConfig, Mode, RefreshScope, parse_servers

NOW = datetime(2026, 1, 1, tzinfo=UTC)
# The least each profile needs to be a valid oauth_connect (or default-mode) server.
MINIMAL: dict[str, dict[str, Any]] = {
    "github": {}, "google": {}, "slack": {}, "atlassian": {}, "gitlab": {},
    "microsoft": {"tenant": "contoso.onmicrosoft.com"},
    "okta": {"domain": "example.okta.com"},
    "auth0": {"domain": "example.eu.auth0.com"},
    "keycloak": {"base_url": "https://sso.example.com", "realm": "acme"},
}


def parse(auth: dict[str, Any], name: str = "svc") -> AuthBrokerConfig:
    entry = {"name": name, "url": "https://mcp.example/mcp", "auth_broker": {"client_id": "cid", **auth}}
    return parse_servers({"servers": [entry]})[name].auth_broker


def config_error(auth: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(auth)
    return info.value.message


def test_every_profile_is_covered_here() -> None:
    assert set(MINIMAL) == set(PROFILES)


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_profile_fills_https_endpoints_and_names_itself(name: str) -> None:
    cfg = parse({"provider": name, **MINIMAL[name]})
    assert cfg.provider == name
    assert cfg.token_endpoint is not None and cfg.token_endpoint.startswith("https://")
    assert cfg.authorization_endpoint is not None and cfg.authorization_endpoint.startswith("https://")
    assert "{" not in cfg.token_endpoint + cfg.authorization_endpoint + (cfg.revocation_endpoint or "")
    assert PROFILES[name].source.startswith("https://")


def test_templated_endpoints_use_their_parameters() -> None:
    ms = parse({"provider": "microsoft", "tenant": "contoso.onmicrosoft.com"})
    assert ms.token_endpoint == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    okta = parse({"provider": "okta", "domain": "acme.okta.com"})
    assert okta.revocation_endpoint == "https://acme.okta.com/oauth2/default/v1/revoke"
    auth0 = parse({"provider": "auth0", "domain": "acme.eu.auth0.com"})
    assert auth0.token_endpoint == "https://acme.eu.auth0.com/oauth/token"
    kc = parse({"provider": "keycloak", "base_url": "https://sso.example.com/", "realm": "acme"})
    assert kc.token_endpoint == "https://sso.example.com/realms/acme/protocol/openid-connect/token"
    assert parse({"provider": "gitlab"}).token_endpoint == "https://gitlab.com/oauth/token"
    own = parse({"provider": "gitlab", "base_url": "https://git.example.org"})
    assert own.authorization_endpoint == "https://git.example.org/oauth/authorize"


def test_profile_quirks_as_data() -> None:
    github = parse({"provider": "github"})
    assert github.mode is Mode.OAUTH_CONNECT and github.refresh_token_idle_seconds == 15_897_600
    google = parse({"provider": "google"})
    assert dict(google.extra_authorize_params) == {"access_type": "offline", "prompt": "consent"}
    assert google.refresh_token_idle_seconds == 180 * 86400 and google.refresh_scope is RefreshScope.OMIT
    ms = parse({"provider": "microsoft", "tenant": "common", "scopes": ["User.Read"]})
    assert ms.refresh_scope is RefreshScope.CONFIGURED and ms.scopes == ("User.Read", "offline_access")
    assert ms.refresh_token_idle_seconds == 90 * 86400
    atlassian = parse({"provider": "atlassian", "scopes": "read:jira-work"})
    assert dict(atlassian.extra_authorize_params)["audience"] == "api.atlassian.com"
    assert atlassian.scopes == ("read:jira-work", "offline_access")
    assert parse({"provider": "slack"}).authorize_scope_param == "user_scope"
    assert parse({"provider": "keycloak", **MINIMAL["keycloak"]}).mode is Mode.TOKEN_EXCHANGE


def test_connect_scopes_only_for_oauth_connect() -> None:
    obo = parse({"provider": "microsoft", "tenant": "contoso.onmicrosoft.com", "mode": "entra_obo",
                 "scopes": ["api://x/.default"]})
    assert obo.mode is Mode.ENTRA_OBO and obo.scopes == ("api://x/.default",)
    assert parse({"provider": "okta", "domain": "a.okta.com", "scopes": ["offline_access", "openid"]}).scopes \
        == ("offline_access", "openid")


def test_explicit_keys_override_the_profile() -> None:
    cfg = parse({
        "provider": "google", "token_endpoint": "http://127.0.0.1:9/token", "refresh_token_idle_seconds": 60,
        "refresh_scope": "configured", "mode": "oauth_connect",
    })
    assert cfg.token_endpoint == "http://127.0.0.1:9/token"
    assert cfg.authorization_endpoint == "https://accounts.google.com/o/oauth2/v2/auth"
    assert (cfg.refresh_token_idle_seconds, cfg.refresh_scope) == (60, RefreshScope.CONFIGURED)


def test_explicit_authorize_params_merge_key_by_key_and_null_drops() -> None:
    cfg = parse({"provider": "google", "extra_authorize_params": {"prompt": None, "hd": "example.com"}})
    assert dict(cfg.extra_authorize_params) == {"access_type": "offline", "hd": "example.com"}


def test_a_parameter_is_not_needed_when_every_endpoint_using_it_is_explicit() -> None:
    cfg = parse({"provider": "microsoft", "token_endpoint": "http://127.0.0.1:9/token",
                 "authorization_endpoint": "http://127.0.0.1:9/authorize"})
    assert cfg.token_endpoint == "http://127.0.0.1:9/token"


@pytest.mark.parametrize(("auth", "message"), [
    ({"provider": "microsoft"}, "server 'svc': auth_broker.tenant: required by provider microsoft"),
    ({"provider": "okta"}, "server 'svc': auth_broker.domain: required by provider okta"),
    ({"provider": "keycloak", "base_url": "https://sso.example.com"},
     "server 'svc': auth_broker.realm: required by provider keycloak"),
    ({"provider": "github", "tenant": "x"}, "server 'svc': auth_broker.tenant: not used by provider github"),
    ({"mode": "oauth_connect", "domain": "a.okta.com"},
     "server 'svc': auth_broker.domain: only used with a provider profile"),
])
def test_parameter_errors_name_the_field(auth: dict[str, Any], message: str) -> None:
    assert config_error(auth) == message


@pytest.mark.parametrize(("auth", "field"), [
    ({"provider": "okta", "domain": "https://SECRETVALUE.okta.com/x"}, "auth_broker.domain"),
    ({"provider": "microsoft", "tenant": "SECRETVALUE/../x"}, "auth_broker.tenant"),
    ({"provider": "keycloak", "base_url": "ftp://SECRETVALUE", "realm": "a"}, "auth_broker.base_url"),
    ({"provider": "keycloak", "base_url": "https://sso.example.com", "realm": "SECRETVALUE/x"}, "auth_broker.realm"),
    ({"provider": "SECRETVALUE"}, "auth_broker.provider"),
    ({"provider": "google", "extra_authorize_params": {"access_type": "SECRETVALUE\n"}},
     "auth_broker.extra_authorize_params.access_type"),
    ({"provider": "google", "extra_authorize_params": {"state": "SECRETVALUE"}},
     "auth_broker.extra_authorize_params"),
    ({"provider": "google", "extra_authorize_params": "SECRETVALUE"}, "auth_broker.extra_authorize_params"),
])
def test_bad_values_are_refused_without_echoing_them(auth: dict[str, Any], field: str) -> None:
    message = config_error(auth)
    assert message.startswith(f"server 'svc': {field}: ")
    assert "SECRETVALUE" not in message


def test_unknown_provider_lists_the_known_ones() -> None:
    assert "one of github, google, microsoft" in config_error({"provider": "githib"})


def query(cfg: AuthBrokerConfig) -> dict[str, list[str]]:
    return parse_qs(urlsplit(authorize_url(cfg, "st", "ch", "https://gw.example/cb")).query)


def test_authorize_url_carries_profile_extras() -> None:
    google = query(parse({"provider": "google", "scopes": ["openid"]}))
    assert (google["access_type"], google["prompt"], google["scope"]) == (["offline"], ["consent"], ["openid"])
    atlassian = query(parse({"provider": "atlassian", "scopes": ["read:jira-work"]}))
    assert atlassian["audience"] == ["api.atlassian.com"]
    assert atlassian["scope"] == ["read:jira-work offline_access"]
    slack = query(parse({"provider": "slack", "scopes": ["chat:write"]}))
    assert slack["user_scope"] == ["chat:write"] and "scope" not in slack
    plain = query(parse({"mode": "oauth_connect", "token_endpoint": "https://as.example/t",
                         "authorization_endpoint": "https://as.example/a", "scopes": ["x"]}))
    assert set(plain) == {"response_type", "client_id", "redirect_uri", "state", "code_challenge",
                          "code_challenge_method", "scope"}


# -- response adapters -----------------------------------------------------------


def parse_with(provider: str, body: dict[str, Any], status: int = 200) -> Any:
    return parse_token_response(status, {}, json.dumps(body).encode(), obtained_via=ObtainedVia.CONNECT_FLOW,
                                now=NOW, adapt=response_adapter(provider))


@pytest.mark.parametrize(("code", "mapped"), [
    ("bad_refresh_token", "invalid_grant"), ("bad_verification_code", "invalid_grant"),
    ("incorrect_client_credentials", "invalid_client"), ("unsupported_grant_type", "unsupported_grant_type"),
])
def test_github_200_errors_become_rfc_errors(code: str, mapped: str) -> None:
    with pytest.raises(UpstreamError) as info:
        parse_with("github", {"error": code, "error_description": "SECRETVALUE", "error_uri": "https://x"})
    assert (info.value.status, info.value.oauth_error, info.value.retryable) == (200, mapped, False)
    assert "SECRETVALUE" not in str(info.value)


def test_github_token_response_passes_through() -> None:
    cred = parse_with("github", {"access_token": "ghu_abc", "token_type": "bearer", "expires_in": 28800,
                                 "refresh_token": "ghr_def", "refresh_token_expires_in": 15897600, "scope": ""})
    assert (cred.access_token.reveal(), cred.refresh_token.reveal(), cred.token_type) == ("ghu_abc", "ghr_def", "Bearer")
    assert (cred.expires_at - NOW).total_seconds() == 28800


def test_slack_user_token_is_taken_from_authed_user() -> None:
    cred = parse_with("slack", {
        "ok": True, "access_token": "xoxb-bot", "token_type": "bot", "scope": "commands",
        "authed_user": {"id": "U1", "scope": "chat:write", "access_token": "xoxe.xoxp-user", "token_type": "user",
                        "refresh_token": "xoxe-1-user", "expires_in": 43200},
    })
    assert cred.access_token.reveal() == "xoxe.xoxp-user" and cred.refresh_token.reveal() == "xoxe-1-user"
    assert (cred.token_type, cred.scopes, (cred.expires_at - NOW).total_seconds()) == ("Bearer", ("chat:write",), 43200)


def test_slack_refresh_answer_at_top_level() -> None:
    cred = parse_with("slack", {"ok": True, "access_token": "xoxe.xoxp-2", "token_type": "user",
                                "refresh_token": "xoxe-1-2", "expires_in": 43200, "authed_user": {"id": "U1"}})
    assert cred.access_token.reveal() == "xoxe.xoxp-2" and cred.token_type == "Bearer"


@pytest.mark.parametrize(("code", "mapped", "retryable"), [
    ("invalid_refresh_token", "invalid_grant", False), ("bad_client_secret", "invalid_client", False),
    ("ratelimited", "temporarily_unavailable", True), ("something_new", None, False),
])
def test_slack_ok_false_becomes_rfc_error(code: str, mapped: str | None, retryable: bool) -> None:
    with pytest.raises(UpstreamError) as info:
        parse_with("slack", {"ok": False, "error": code})
    assert (info.value.oauth_error, info.value.retryable) == (mapped, retryable)


def test_profiles_without_adapter_use_the_generic_parser() -> None:
    assert response_adapter(None) is None and response_adapter("google") is None
    assert response_adapter("github") is not None and response_adapter("slack") is not None
