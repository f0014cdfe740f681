"""Server config: parsing, every validation rule, loading files, server keys."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from broker.errors import ConfigError, UnknownServer
from broker.secret import Secret
from broker.servers import (
    ACCESS_TOKEN_TYPE,
    AuthBrokerConfig,
    ClientAuth,
    Mode,
    ServerConfig,
    ServerRegistry,
    load_servers,
    parse_servers,
    server_key,
    servers_from_settings,
)
from broker.settings import Settings

SECRET = "s3cr3t-VALUE-do-not-print-42"


def server(auth: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A valid token_exchange server, changed by ``auth`` and ``fields``.

    A value of None in either deletes that key.
    """
    auth_broker: dict[str, Any] = {"mode": "token_exchange", "token_endpoint": "https://idp.example/token"}
    auth_broker.update(auth or {})
    entry: dict[str, Any] = {
        "name": "github",
        "url": "https://mcp.github.example/mcp",
        "auth_broker": {k: v for k, v in auth_broker.items() if v is not None},
    }
    entry.update(fields)
    return {k: v for k, v in entry.items() if v is not None}


def connect(**auth: Any) -> dict[str, Any]:
    """A valid oauth_connect server, changed by ``auth``."""
    base = {
        "mode": "oauth_connect",
        "token_endpoint": "https://auth.example/token",
        "authorization_endpoint": "https://auth.example/authorize",
        "client_id": "abc",
    }
    base.update(auth)
    return server(base)


def parse_one(entry: dict[str, Any], environ: dict[str, str] | None = None) -> ServerConfig:
    registry = parse_servers([entry], environ or {})
    assert len(registry) == 1
    return next(iter(registry.values()))


# --------------------------------------------------------------------------- valid


def test_minimal_server_gets_documented_defaults() -> None:
    s = parse_one(server())
    assert s.name == "github"
    assert s.url == "https://mcp.github.example/mcp"
    assert s.mode is Mode.TOKEN_EXCHANGE
    ab = s.auth_broker
    assert ab.token_endpoint == "https://idp.example/token"
    assert ab.client_auth is ClientAuth.CLIENT_SECRET_POST
    assert ab.client_id is None and ab.client_secret is None
    assert ab.scopes == ()
    assert ab.requested_token_type == ACCESS_TOKEN_TYPE
    assert ab.header == "Authorization"
    assert ab.header_format == "Bearer {token}"
    assert s.key == server_key("github", "https://mcp.github.example/mcp")


def test_every_field_is_read() -> None:
    s = parse_one(
        connect(
            revocation_endpoint="https://auth.example/revoke",
            issuer="https://auth.example",
            client_secret=SECRET,
            client_auth="client_secret_basic",
            scopes=["repo", "read:user"],
            resource="https://mcp.github.example/",
            audience="github-mcp",
            requested_token_type="urn:ietf:params:oauth:token-type:jwt",
            header="X-Upstream-Token",
            header_format="token {token}",
        )
    )
    ab = s.auth_broker
    assert ab.mode is Mode.OAUTH_CONNECT
    assert ab.authorization_endpoint == "https://auth.example/authorize"
    assert ab.revocation_endpoint == "https://auth.example/revoke"
    assert ab.issuer == "https://auth.example"
    assert ab.client_id == "abc"
    assert isinstance(ab.client_secret, Secret) and ab.client_secret.reveal() == SECRET
    assert ab.client_auth is ClientAuth.CLIENT_SECRET_BASIC
    assert ab.scopes == ("repo", "read:user")
    assert ab.resource == "https://mcp.github.example/"
    assert ab.audience == "github-mcp"
    assert ab.requested_token_type == "urn:ietf:params:oauth:token-type:jwt"
    assert ab.header == "X-Upstream-Token"
    assert ab.header_format == "token {token}"
    assert SECRET not in repr(s)


def test_entra_obo_server() -> None:
    s = parse_one(
        server(
            {
                "mode": "entra_obo",
                "token_endpoint": "https://login.microsoftonline.com/t/oauth2/v2.0/token",
                "client_id": "app",
                "client_secret": SECRET,
                "scopes": "api://downstream/.default",
            }
        )
    )
    assert s.mode is Mode.ENTRA_OBO
    assert s.auth_broker.scopes == ("api://downstream/.default",)


@pytest.mark.parametrize("mode", ["token_exchange", "oauth_connect"])
def test_issuer_supplies_endpoints_by_discovery(mode: str) -> None:
    s = parse_one(
        server({"mode": mode, "token_endpoint": None, "issuer": "https://auth.example/tenant", "client_id": "c"})
    )
    assert s.auth_broker.token_endpoint is None
    assert s.auth_broker.authorization_endpoint is None
    assert s.auth_broker.issuer == "https://auth.example/tenant"


def test_scopes_as_string_or_list_are_equal_and_deduplicated() -> None:
    a = parse_one(server({"scopes": "repo  read:user repo"}))
    b = parse_one(server({"scopes": ["repo", "read:user"]}))
    assert a.auth_broker.scopes == b.auth_broker.scopes == ("repo", "read:user")


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8000/token",
        "http://127.9.8.7/token",
        "http://localhost:9000/token",
        "http://[::1]:9000/token",
        "https://idp.example:8443/oauth2/token?tenant=x",
    ],
)
def test_endpoints_allow_https_and_loopback_http(endpoint: str) -> None:
    s = parse_one(server({"token_endpoint": endpoint, "revocation_endpoint": endpoint}))
    assert s.auth_broker.token_endpoint == endpoint


def test_upstream_url_may_be_plain_http() -> None:
    assert parse_one(server(url="http://mcp.internal:8080/mcp")).url == "http://mcp.internal:8080/mcp"


@pytest.mark.parametrize("header_format", ["{token}", "Bearer {token}", "token={token}; v=1", "\t{token}"])
def test_header_format_accepted(header_format: str) -> None:
    assert parse_one(server({"header_format": header_format})).auth_broker.header_format == header_format


@pytest.mark.parametrize("header", ["Authorization", "X-Api-Key", "x_token", "Private-Token", "Cookie"])
def test_header_accepted(header: str) -> None:
    assert parse_one(server({"header": header})).auth_broker.header == header


def test_public_client_without_secret_is_allowed() -> None:
    s = parse_one(connect())
    assert s.auth_broker.client_secret is None
    assert s.auth_broker.client_auth is ClientAuth.CLIENT_SECRET_POST


def test_null_client_auth_means_default() -> None:
    entry = server()
    entry["auth_broker"]["client_auth"] = None
    assert parse_one(entry).auth_broker.client_auth is ClientAuth.CLIENT_SECRET_POST


@pytest.mark.parametrize("protocol", ["http", "sse", "streamable-http", "auto"])
def test_http_protocols_accepted(protocol: str) -> None:
    assert parse_one(server(protocol=protocol)).name == "github"


def test_mcpproxy_extra_fields_are_tolerated() -> None:
    entry = server(enabled=True, headers={"X-Static": "1"}, quarantined=False, created="2025-01-01T00:00:00Z")
    assert parse_one(entry).name == "github"


# --------------------------------------------------------------------------- shapes


def _two() -> list[dict[str, Any]]:
    return [server(), server(name="linear", url="https://mcp.linear.example/sse")]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"servers": _two()}, id="servers"),
        pytest.param(_two(), id="list"),
        pytest.param({"mcpServers": _two()}, id="mcpServers-list"),
        pytest.param(
            {"mcpServers": {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in _two()}},
            id="mcpServers-dict",
        ),
        pytest.param({"servers": {s["name"]: s for s in _two()}}, id="servers-dict-with-names"),
    ],
)
def test_accepted_top_level_shapes(data: object) -> None:
    registry = parse_servers(data, {})
    assert list(registry) == ["github", "linear"]
    assert registry["linear"].url == "https://mcp.linear.example/sse"


@pytest.mark.parametrize("data", [None, [], {"servers": []}, {"mcpServers": {}}, {"servers": None}])
def test_empty_config_is_an_empty_registry(data: object) -> None:
    assert len(parse_servers(data, {})) == 0


@pytest.mark.parametrize(
    "data, match",
    [
        ("servers", r"expected a list of servers"),
        (42, r"expected a list of servers"),
        ({"servers": "github"}, r"expected a list of servers"),
        ({"other": []}, r"expected one top-level 'servers' or 'mcpServers' key"),
        ({"servers": [], "mcpServers": []}, r"expected one top-level 'servers' or 'mcpServers' key"),
        (["github"], r"server #1: entry: must be a mapping"),
        ({"mcpServers": {"github": dict(server(), name="gitlab")}}, r"server #1: name: differs from its mcpServers key"),
    ],
)
def test_bad_top_level_shapes(data: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_servers(data, {})


# --------------------------------------------------------------------------- rules

G = r"server 'github': "

RULES = [
    # mode
    ("mode-missing", server({"mode": None}), G + r"auth_broker\.mode: must be one of token_exchange, entra_obo, oauth_connect"),
    ("mode-unknown", server({"mode": "client_credentials"}), G + r"auth_broker\.mode: must be one of"),
    ("mode-case", server({"mode": "Token_Exchange"}), G + r"auth_broker\.mode: must be one of"),
    ("mode-list", server({"mode": ["token_exchange"]}), G + r"auth_broker\.mode: must be one of"),
    # required endpoints and client id
    ("token-endpoint-missing", server({"token_endpoint": None}), G + r"auth_broker\.token_endpoint: required \(or give issuer"),
    ("authorization-endpoint-missing", connect(authorization_endpoint=None), G + r"auth_broker\.authorization_endpoint: required for oauth_connect"),
    ("connect-client-id-missing", connect(client_id=None), G + r"auth_broker\.client_id: required for oauth_connect"),
    ("obo-client-id-missing", server({"mode": "entra_obo"}), G + r"auth_broker\.client_id: required for entra_obo"),
    ("secret-without-client-id", server({"client_secret": SECRET}), G + r"auth_broker\.client_id: required when a client secret is given"),
    ("client-id-empty", server({"client_id": " "}), G + r"auth_broker\.client_id: must be a non-empty string"),
    ("client-id-number", server({"client_id": 12}), G + r"auth_broker\.client_id: must be a non-empty string"),
    # stdio and url
    ("stdio-command", server(url=None, command="npx", args=["-y", "server"]), G + r"protocol: stdio upstreams are not supported"),
    ("stdio-protocol", server(protocol="stdio"), G + r"protocol: stdio upstreams are not supported"),
    ("protocol-unknown", server(protocol="websocket"), G + r"protocol: must be one of"),
    ("protocol-type", server(protocol=1), G + r"protocol: must be a string"),
    ("url-missing", server(url=None), G + r"url: required"),
    ("url-empty", server(url=""), G + r"url: must be a non-empty string"),
    ("url-ftp", server(url="ftp://files.example/"), G + r"url: must be an http or https URL"),
    ("url-relative", server(url="/mcp"), G + r"url: must be an http or https URL"),
    ("url-no-host", server(url="https:///mcp"), G + r"url: URL has no host"),
    ("url-space", server(url="https://a b/"), G + r"url: must not contain spaces or control characters"),
    ("url-bad-ipv6", server(url="https://[::1/mcp"), G + r"url: is not a valid URL"),
    ("url-bad-port", server(url="https://host:99999/"), G + r"url: is not a valid URL"),
    ("url-userinfo", server(url="https://user:pw@host/"), G + r"url: must not contain credentials"),
    # endpoints: https, http only for loopback
    *[
        (f"{field}-http", server({field: "http://idp.example/x", "client_id": "c"}),
         G + rf"auth_broker\.{field}: must be an https URL \(http only for loopback hosts\)")
        for field in ("token_endpoint", "authorization_endpoint", "revocation_endpoint", "issuer")
    ],
    ("endpoint-http-loopback-lookalike", server({"token_endpoint": "http://127.0.0.1.evil.example/t"}), G + r"auth_broker\.token_endpoint: must be an https URL"),
    ("endpoint-http-localhost-lookalike", server({"token_endpoint": "http://localhost.evil.example/t"}), G + r"auth_broker\.token_endpoint: must be an https URL"),
    ("endpoint-http-private-ip", server({"token_endpoint": "http://10.0.0.1/t"}), G + r"auth_broker\.token_endpoint: must be an https URL"),
    ("endpoint-ftp", server({"token_endpoint": "ftp://idp.example/t"}), G + r"auth_broker\.token_endpoint: must be an https URL"),
    ("endpoint-no-scheme", server({"token_endpoint": "idp.example/token"}), G + r"auth_broker\.token_endpoint: must be an https URL"),
    ("endpoint-no-host", server({"token_endpoint": "https:///token"}), G + r"auth_broker\.token_endpoint: URL has no host"),
    ("endpoint-fragment", server({"token_endpoint": "https://idp.example/t#x"}), G + r"auth_broker\.token_endpoint: must not contain a fragment"),
    ("endpoint-userinfo", server({"token_endpoint": "https://a:b@idp.example/t"}), G + r"auth_broker\.token_endpoint: must not contain credentials"),
    ("endpoint-newline", server({"token_endpoint": "https://idp.example/t\n"}), G + r"auth_broker\.token_endpoint: must not contain spaces or control"),
    ("endpoint-type", server({"token_endpoint": ["https://idp.example/t"]}), G + r"auth_broker\.token_endpoint: must be a non-empty string"),
    ("issuer-query", server({"issuer": "https://idp.example/?tenant=a"}), G + r"auth_broker\.issuer: must not contain a query"),
    # header
    *[
        (f"header-bad-{i}", server({"header": h}), G + r"auth_broker\.header: must be a valid HTTP header name")
        for i, h in enumerate(["X Token", "X-Token:", "Authörization", "(x)", "X\r\nInjected"])
    ],
    ("header-empty", server({"header": ""}), G + r"auth_broker\.header: must be a non-empty string"),
    *[
        (f"header-forbidden-{h}", server({"header": h}), G + r"auth_broker\.header: must not be a connection or framing header")
        for h in ["Host", "host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "TE"]
    ],
    # header_format
    ("header-format-no-token", server({"header_format": "Bearer"}), G + r"auth_broker\.header_format: must contain \{token\} exactly once"),
    ("header-format-two-tokens", server({"header_format": "{token} {token}"}), G + r"auth_broker\.header_format: must contain \{token\} exactly once"),
    ("header-format-other-placeholder", server({"header_format": "{scheme} {token}"}), G + r"auth_broker\.header_format: must not contain other \{\.\.\.\} placeholders"),
    ("header-format-attribute", server({"header_format": "Bearer {token.upper}"}), G + r"auth_broker\.header_format: must contain \{token\} exactly once"),
    ("header-format-stray-brace", server({"header_format": "Bearer {token}}"}), G + r"auth_broker\.header_format: must not contain other"),
    ("header-format-cr", server({"header_format": "Bearer {token}\r"}), G + r"auth_broker\.header_format: must not contain CR or LF"),
    ("header-format-lf", server({"header_format": "Bearer {token}\nX-Evil: 1"}), G + r"auth_broker\.header_format: must not contain CR or LF"),
    ("header-format-nul", server({"header_format": "Bearer \x00{token}"}), G + r"auth_broker\.header_format: must not contain control characters"),
    ("header-format-type", server({"header_format": 1}), G + r"auth_broker\.header_format: must be a non-empty string"),
    # client auth and secrets
    ("client-auth-unknown", server({"client_auth": "tls_client_auth", "client_id": "c"}), G + r"auth_broker\.client_auth: must be one of client_secret_post, client_secret_basic, private_key_jwt"),
    ("private-key-jwt-no-key", server({"client_auth": "private_key_jwt", "client_id": "c"}), G + r"auth_broker\.client_auth: private_key_jwt needs client_assertion_key_file or client_assertion_key_env"),
    ("client-auth-basic-no-secret", server({"client_auth": "client_secret_basic", "client_id": "c"}), G + r"auth_broker\.client_auth: client_secret_basic requires a client secret"),
    ("secret-and-env", server({"client_id": "c", "client_secret": SECRET, "client_secret_env": "X"}), G + r"auth_broker\.client_secret: give client_secret or client_secret_env, not both"),
    ("secret-empty", server({"client_id": "c", "client_secret": ""}), G + r"auth_broker\.client_secret: must be a non-empty string"),
    ("secret-number", server({"client_id": "c", "client_secret": 1234}), G + r"auth_broker\.client_secret: must be a non-empty string"),
    ("secret-env-missing", server({"client_id": "c", "client_secret_env": "GITHUB_CLIENT_SECRET"}), G + r"auth_broker\.client_secret_env: environment variable 'GITHUB_CLIENT_SECRET' is not set"),
    ("secret-env-bad-name", server({"client_id": "c", "client_secret_env": "A-B"}), G + r"auth_broker\.client_secret_env: must be an environment variable name"),
    # scopes, resource
    ("scopes-type", server({"scopes": {"repo": True}}), G + r"auth_broker\.scopes: must be a list or a space-separated string"),
    ("scopes-item-type", server({"scopes": ["repo", 3]}), G + r"auth_broker\.scopes: each scope must be"),
    ("scopes-item-space", server({"scopes": ["repo read"]}), G + r"auth_broker\.scopes: each scope must be"),
    ("scopes-item-quote", server({"scopes": ['a"b']}), G + r"auth_broker\.scopes: each scope must be"),
    ("resource-relative", server({"resource": "mcp.example"}), G + r"auth_broker\.resource: must be an absolute URI without a fragment"),
    ("resource-fragment", server({"resource": "https://mcp.example/#x"}), G + r"auth_broker\.resource: must be an absolute URI"),
    ("audience-type", server({"audience": ["a"]}), G + r"auth_broker\.audience: must be a non-empty string"),
    ("requested-token-type-empty", server({"requested_token_type": ""}), G + r"auth_broker\.requested_token_type: must be a non-empty string"),
    # auth_broker block
    ("auth-broker-missing", server(auth_broker=None), G + r"auth_broker: required"),
    ("auth-broker-not-mapping", server(auth_broker="token_exchange"), G + r"auth_broker: must be a mapping"),
    ("auth-broker-unknown-key", server({"tokn_endpoint": "https://x/"}), G + r"auth_broker: unknown field\(s\) 'tokn_endpoint' \(did you mean 'token_endpoint'\?\)"),
    ("auth-broker-unknown-keys", server({"zzz": 1, "client_secret_environment": "X"}), G + r"auth_broker: unknown field\(s\) 'client_secret_environment', 'zzz'"),
    # names
    ("name-missing", server(name=None), r"server #1: name: required, a non-empty string"),
    ("name-empty", server(name=""), r"server #1: name: required"),
    ("name-number", server(name=7), r"server #1: name: required, a non-empty string"),
    ("name-slash", server(name="git/hub"), r"server #1: name: must not contain '/'"),
    ("name-control", server(name="git\x07hub"), r"server #1: name: must be printable"),
    ("name-newline", server(name="git\nhub"), r"server #1: name: must be printable"),
    ("name-too-long", server(name="g" * 129), r"server #1: name: must be at most 128 characters"),
    ("name-padded", server(name=" github"), r"server #1: name: must not start or end with whitespace"),
]


@pytest.mark.parametrize("entry, match", [pytest.param(e, m, id=i) for i, e, m in RULES])
def test_rule(entry: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_servers([entry], {})


def test_name_of_128_characters_is_allowed() -> None:
    assert parse_one(server(name="g" * 128)).name == "g" * 128


@pytest.mark.parametrize("name", ["auth0|5f7c", "GitHub Enterprise", "ünïcødé", "a.b:c@d"])
def test_printable_names_allowed(name: str) -> None:
    assert parse_one(server(name=name)).name == name


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"server 'github': name: duplicate \(also server #1\)"):
        parse_servers([server(), server(url="https://other.example/")], {})


def test_rule_errors_are_config_errors_with_code() -> None:
    with pytest.raises(ConfigError) as info:
        parse_servers([server({"mode": "x"})], {})
    assert info.value.code == "config_error"


# --------------------------------------------------------------------------- secrets


def test_client_secret_env_is_read_from_environ() -> None:
    entry = server({"client_id": "c", "client_secret_env": "GH_SECRET", "client_auth": "client_secret_basic"})
    s = parse_one(entry, {"GH_SECRET": SECRET})
    assert s.auth_broker.client_secret == Secret(SECRET)
    assert SECRET not in repr(s) and SECRET not in str(s)


def test_client_secret_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDBROKER_TEST_GH_SECRET", SECRET)
    entry = server({"client_id": "c", "client_secret_env": "CREDBROKER_TEST_GH_SECRET"})
    s = next(iter(parse_servers([entry]).values()))
    assert s.auth_broker.client_secret is not None
    assert s.auth_broker.client_secret.reveal() == SECRET


def test_client_secret_env_empty_value_is_missing() -> None:
    entry = server({"client_id": "c", "client_secret_env": "GH_SECRET"})
    with pytest.raises(ConfigError, match=r"server 'github': auth_broker\.client_secret_env: .*'GH_SECRET'"):
        parse_servers([entry], {"GH_SECRET": ""})


SECRET_LEAKS = [
    pytest.param(server({"client_secret": SECRET}), {}, id="no-client-id"),
    pytest.param(server({"client_id": "c", "client_secret": SECRET, "client_secret_env": "E"}), {}, id="both"),
    pytest.param(server({"client_id": "c", "client_secret": SECRET, "token_endpoint": "http://x/"}), {}, id="bad-endpoint"),
    pytest.param(server({"client_id": "c", "client_secret_env": "E", "header": "Host"}), {"E": SECRET}, id="env-then-bad-header"),
    pytest.param(server({"client_id": "c", "client_secret_env": "E", "mode": "nope"}), {"E": SECRET}, id="env-bad-mode"),
    pytest.param(server({"client_id": "c", "client_secret_env": "E"}, url=None), {"E": SECRET}, id="env-no-url"),
    pytest.param(server({"client_id": "c", "client_secret": SECRET, "client_auth": SECRET}), {}, id="secret-as-client-auth"),
    pytest.param(server({"client_id": "c", "mode": SECRET}), {}, id="secret-as-mode"),
    pytest.param(server({"client_id": "c", "header_format": SECRET}), {}, id="secret-as-header-format"),
    pytest.param(server({"token_endpoint": SECRET}), {}, id="secret-as-endpoint"),
    pytest.param(server(url=f"https://u:{SECRET}@host/"), {}, id="secret-in-url"),
    pytest.param(server(protocol=SECRET), {}, id="secret-as-protocol"),
]


@pytest.mark.parametrize("entry, environ", SECRET_LEAKS)
def test_secret_never_in_error_message(entry: dict[str, Any], environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_servers({"servers": [entry]}, environ)
    text = " ".join([str(info.value), repr(info.value), json.dumps(info.value.to_dict())])
    assert SECRET not in text
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)


@pytest.mark.parametrize(
    "name, text",
    [
        ("bad.yaml", f'servers:\n  - name: github\n    auth_broker: {{client_secret: "{SECRET}\n'),
        ("bad.yaml", f"servers:\n  - name: github\n\tclient_secret: {SECRET}\n"),
        ("bad.json", f'{{"servers": [{{"client_secret": "{SECRET}" ]}}'),
        ("bad.conf", f'servers: [{{client_secret: "{SECRET}"'),
    ],
)
def test_secret_never_in_file_syntax_errors(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"servers file .*: invalid (YAML|JSON)") as info:
        load_servers(path, {})
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None


# --------------------------------------------------------------------------- files

MCPPROXY_JSON = {
    "listen": ":8080",
    "data_dir": "~/.mcpproxy",
    "mcpServers": [
        {
            "name": "github",
            "url": "https://api.githubcopilot.com/mcp/",
            "protocol": "http",
            "enabled": True,
            "auth_broker": {
                "mode": "oauth_connect",
                "authorization_endpoint": "https://github.com/login/oauth/authorize",
                "token_endpoint": "https://github.com/login/oauth/access_token",
                "client_id": "Iv1.abc",
                "client_secret_env": "GITHUB_OAUTH_SECRET",
                "scopes": "repo read:user",
            },
        },
        {
            "name": "internal",
            "url": "http://127.0.0.1:9001/mcp",
            "protocol": "streamable-http",
            "auth_broker": {
                "mode": "token_exchange",
                "issuer": "http://127.0.0.1:9000",
                "audience": "internal-mcp",
                "header": "X-Internal-Token",
                "header_format": "{token}",
            },
        },
    ],
}


def test_mcpproxy_style_json_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "mcp_config.json"
    path.write_text(json.dumps(MCPPROXY_JSON), encoding="utf-8")
    registry = load_servers(path, {"GITHUB_OAUTH_SECRET": SECRET})
    assert list(registry) == ["github", "internal"]
    gh = registry.get_server("github")
    assert gh.mode is Mode.OAUTH_CONNECT
    assert gh.auth_broker.scopes == ("repo", "read:user")
    assert gh.auth_broker.client_secret == Secret(SECRET)
    internal = registry.get_server("internal")
    assert internal.auth_broker.issuer == "http://127.0.0.1:9000"
    assert internal.auth_broker.header == "X-Internal-Token"


def test_mcpproxy_dict_form_json_file_loads(tmp_path: Path) -> None:
    data = {"mcpServers": {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in MCPPROXY_JSON["mcpServers"]}}
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    registry = load_servers(str(path), {"GITHUB_OAUTH_SECRET": SECRET})
    assert registry.get_server("internal").url == "http://127.0.0.1:9001/mcp"


YAML_TEXT = """\
# upstreams for the gateway
servers:
  - name: linear
    url: https://mcp.linear.app/sse
    protocol: sse
    auth_broker:
      mode: token_exchange
      token_endpoint: https://idp.example/oauth2/token
      client_id: gateway
      client_secret_env: LINEAR_SECRET
      client_auth: client_secret_basic
      scopes: [issues:read, issues:write]
      resource: https://mcp.linear.app/
  - name: graph
    url: https://graph.example/mcp
    auth_broker:
      mode: entra_obo
      token_endpoint: https://login.microsoftonline.com/tenant/oauth2/v2.0/token
      client_id: 00000000-0000-0000-0000-000000000000
      client_secret_env: GRAPH_SECRET
      scopes: https://graph.microsoft.com/.default
"""


@pytest.mark.parametrize("name", ["servers.yaml", "servers.yml", "servers.YAML", "servers"])
def test_yaml_file_loads(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(YAML_TEXT, encoding="utf-8")
    registry = load_servers(path, {"LINEAR_SECRET": "a", "GRAPH_SECRET": "b"})
    assert list(registry) == ["linear", "graph"]
    linear = registry["linear"]
    assert linear.auth_broker.client_auth is ClientAuth.CLIENT_SECRET_BASIC
    assert linear.auth_broker.scopes == ("issues:read", "issues:write")
    assert registry["graph"].mode is Mode.ENTRA_OBO


def test_json_file_without_suffix_loads(tmp_path: Path) -> None:
    path = tmp_path / "servers.conf"
    path.write_text(json.dumps({"servers": [server()]}), encoding="utf-8")
    assert list(load_servers(path, {})) == ["github"]


def test_yaml_suffix_is_parsed_as_yaml_only(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    path.write_text(YAML_TEXT, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"servers\.json'?: invalid JSON at line 1"):
        load_servers(path, {})


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text("servers:\n  - name: github\n    url: https://x.example/\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r".*server 'github': auth_broker: required"):
        load_servers(path, {})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"servers file .*nope\.yaml"):
        load_servers(path, {})


def test_empty_yaml_file_is_an_empty_registry(tmp_path: Path) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text("# nothing yet\n", encoding="utf-8")
    assert len(load_servers(path, {})) == 0


def test_servers_from_settings(tmp_path: Path) -> None:
    assert len(servers_from_settings(Settings())) == 0
    path = tmp_path / "servers.yaml"
    path.write_text(YAML_TEXT, encoding="utf-8")
    registry = servers_from_settings(Settings(servers_file=path), {"LINEAR_SECRET": "a", "GRAPH_SECRET": "b"})
    assert set(registry) == {"linear", "graph"}


# --------------------------------------------------------------------------- keys and registry


def test_server_key_is_stable_and_changes_with_url_and_name() -> None:
    key = server_key("github", "https://mcp.github.example/mcp")
    assert key == server_key("github", "https://mcp.github.example/mcp")
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key != server_key("github", "https://mcp.github.example/mcp/")
    assert key != server_key("github", "https://evil.example/mcp")
    assert key != server_key("gitlab", "https://mcp.github.example/mcp")
    # the separator keeps name and URL apart
    assert server_key("a", "bc") != server_key("ab", "c")


def test_server_key_is_pinned() -> None:
    # Stored credentials are indexed by this value: changing the derivation
    # would orphan every stored credential.
    import hashlib

    expected = hashlib.sha256(b"credbroker-server-v1\x00github\x00https://mcp.github.example/mcp").hexdigest()
    assert server_key("github", "https://mcp.github.example/mcp") == expected


def test_registry_lookup() -> None:
    registry = parse_servers([server(), server(name="linear", url="https://linear.example/")], {})
    github = registry.get_server("github")
    assert registry["github"] is github
    assert registry.by_key(github.key) is github
    assert registry.by_key("0" * 64) is None
    assert "github" in registry and "nope" not in registry
    assert len(registry) == 2


def test_get_server_unknown_raises() -> None:
    registry = ServerRegistry([])
    with pytest.raises(UnknownServer) as info:
        registry.get_server("nope<script>")
    assert info.value.code == "unknown_server"
    assert "nope" not in info.value.message and "nope" not in str(info.value.to_dict())  # never echoed
    assert info.value.http_status == 404
    with pytest.raises(KeyError):
        registry["nope"]


def test_dataclasses_are_frozen() -> None:
    s = ServerConfig("a", "https://a.example/", AuthBrokerConfig(mode=Mode.TOKEN_EXCHANGE, token_endpoint="https://t/"))
    with pytest.raises(AttributeError):
        s.url = "https://b.example/"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.auth_broker.header = "Host"  # type: ignore[misc]


def test_mcpproxy_file_skips_servers_the_broker_does_not_serve() -> None:
    """A gateway's own mcpproxy config holds stdio tools and public servers too:
    those without auth_broker are skipped; a brokered stdio server is still refused."""
    from broker.servers import parse_servers as parse

    brokered = {"name": "gh", "url": "https://gh.example.com/mcp",
                "auth_broker": {"mode": "token_exchange", "token_endpoint": "https://idp.example.com/token"}}
    registry = parse({"mcpServers": [
        {"name": "fs", "command": "npx", "args": ["@modelcontextprotocol/server-filesystem"]},
        {"name": "public", "url": "https://public.example.com/mcp"},
        brokered,
    ]}, environ={})
    assert list(registry) == ["gh"]
    with pytest.raises(ConfigError, match="server 'fs': protocol: stdio"):
        parse({"mcpServers": [{"name": "fs", "command": "npx", "auth_broker": brokered["auth_broker"]}]}, environ={})
    with pytest.raises(ConfigError, match="auth_broker"):
        parse({"servers": [{"name": "public", "url": "https://public.example.com/mcp"}]}, environ={})


# -- second round: refresh scope, default lifetime, idle refresh tokens ----------

def _connect_entry(**extra: object) -> dict[str, object]:
    return {"servers": [{"name": "gh", "url": "https://gh.example/mcp", "auth_broker": {
        "mode": "oauth_connect", "token_endpoint": "https://as.example/token",
        "authorization_endpoint": "https://as.example/authorize", "client_id": "c", **extra}}]}


def test_refresh_scope_defaults_to_omit_and_accepts_configured() -> None:
    from broker.servers import RefreshScope

    assert parse_servers(_connect_entry())["gh"].auth_broker.refresh_scope is RefreshScope.OMIT
    cfg = parse_servers(_connect_entry(refresh_scope="configured"))["gh"].auth_broker
    assert cfg.refresh_scope is RefreshScope.CONFIGURED
    with pytest.raises(ConfigError, match="refresh_scope: must be one of omit, configured"):
        parse_servers(_connect_entry(refresh_scope="always"))


@pytest.mark.parametrize("key", ["default_lifetime_seconds", "refresh_token_idle_seconds"])
def test_lifetime_settings_are_whole_positive_seconds(key: str) -> None:
    assert getattr(parse_servers(_connect_entry(**{key: 3600}))["gh"].auth_broker, key) == 3600
    assert getattr(parse_servers(_connect_entry())["gh"].auth_broker, key) is None
    for bad in (0, -5, 1.5, "3600", True):
        with pytest.raises(ConfigError, match=f"gh.*{key}: must be a whole number"):
            parse_servers(_connect_entry(**{key: bad}))
