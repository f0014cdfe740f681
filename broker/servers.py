"""Server config: the upstreams, their ``auth_broker`` blocks and server keys."""

from __future__ import annotations

import difflib
import re
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .errors import ConfigError, UnknownServer
from .providers import PARAM_KEYS, expand_auth_broker
from .jose import SigningKey
from .secret import Secret
from .server_config import (
    DEFAULT_HEADER,
    DEFAULT_HEADER_FORMAT,
    check_env_name,
    check_header,
    check_header_format,
    check_resource,
    check_server_name,
    check_url,
    field_error,
    optional_str,
    parse_authorize_params,
    parse_scopes,
)
from .server_keys import ASSERTION_KEYS, parse_assertion_aud, parse_assertion_key, parse_dpop

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "Mode",
    "ClientAuth",
    "Discover",
    "RefreshScope",
    "AuthBrokerConfig",
    "ServerConfig",
    "ServerRegistry",
    "server_key",
    "parse_servers",
    "check_servers",
    "read_servers_file",
    "unknown_server_message",
    "load_servers",
    "servers_from_settings",
]

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
DPOP_HEADER_FORMAT = "DPoP {token}"  # RFC 9449 section 7.1


class Mode(StrEnum):
    TOKEN_EXCHANGE = "token_exchange"
    ENTRA_OBO = "entra_obo"
    OAUTH_CONNECT = "oauth_connect"
    # SEP-990 / ID-JAG: token exchange at the enterprise IdP, then jwt-bearer upstream.
    IDENTITY_ASSERTION = "identity_assertion"


class Discover(StrEnum):
    """Where endpoints and the client come from when the file does not give them."""

    MCP = "mcp"  # RFC 9728 from the server URL, RFC 8414, RFC 7591 registration


class ClientAuth(StrEnum):
    CLIENT_SECRET_POST = "client_secret_post"
    CLIENT_SECRET_BASIC = "client_secret_basic"
    PRIVATE_KEY_JWT = "private_key_jwt"  # RFC 7523 section 2.2: a signed client assertion


class RefreshScope(StrEnum):
    """Whether the refresh grant carries ``scope`` (RFC 6749 section 6)."""

    OMIT = "omit"  # the default: the new token keeps the originally granted scope
    CONFIGURED = "configured"  # send the configured scopes (Microsoft Entra v2 expects them)


def server_key(name: str, url: str) -> str:
    """Stable id of a server: SHA-256 over name and URL (a new URL is a new server)."""
    return hashlib.sha256(b"credbroker-server-v1\x00" + name.encode() + b"\x00" + url.encode()).hexdigest()


@dataclass(frozen=True)
class AuthBrokerConfig:
    """How credentials for one server are obtained (the ``auth_broker`` block)."""

    mode: Mode
    token_endpoint: str | None = None  # None only when ``issuer`` discovery supplies it
    authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    issuer: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    client_auth: ClientAuth = ClientAuth.CLIENT_SECRET_POST
    scopes: tuple[str, ...] = ()
    resource: str | None = None
    audience: str | None = None
    requested_token_type: str = ACCESS_TOKEN_TYPE
    header: str = DEFAULT_HEADER
    header_format: str = DEFAULT_HEADER_FORMAT
    refresh_scope: RefreshScope = RefreshScope.OMIT
    # Lifetime assumed when a token response has no expires_in (Salesforce,
    # Zendesk); None: the token is treated as never expiring.
    default_lifetime_seconds: int | None = None
    # Refresh tokens that die of disuse (Google, Atlassian, Microsoft): the beat
    # renews an idle connect credential before this much time passes unused.
    refresh_token_idle_seconds: int | None = None
    # The provider profile that filled this block (``provider: NAME``), if any.
    provider: str | None = None
    # Added to the authorization URL, e.g. Google's access_type=offline.
    extra_authorize_params: tuple[tuple[str, str], ...] = ()
    # Where the scopes go on the authorization URL (Slack: user_scope); set by a profile.
    authorize_scope_param: str = "scope"
    # private_key_jwt: the assertion signing key and what its ``aud`` names
    # (``token_endpoint`` or ``issuer``); see ``broker.server_keys``.
    client_assertion_key: SigningKey | None = None
    client_assertion_aud: str = "token_endpoint"
    # DPoP (RFC 9449): tokens bound to a per-(user, server) key; resolves carry a proof.
    dpop: bool = False
    # Hosts (besides the issuer's) that discovered endpoints may name; listed
    # hosts may also resolve to private addresses (an explicit operator choice).
    discovery_hosts: tuple[str, ...] = ()
    # ``discover: mcp``: endpoints, resource and client found from the server URL at run time.
    discover: Discover | None = None
    # identity_assertion: leg 1 (token exchange to an ID-JAG) at the enterprise IdP.
    idp_token_endpoint: str | None = None
    idp_client_id: str | None = None
    idp_client_secret: Secret | None = None


@dataclass(frozen=True)
class ServerConfig:
    """One upstream the gateway calls."""

    name: str
    url: str
    auth_broker: AuthBrokerConfig

    @cached_property
    def key(self) -> str:
        # Cached: read several times on every resolve, and name and URL never change.
        return server_key(self.name, self.url)

    @property
    def mode(self) -> Mode:
        return self.auth_broker.mode


class ServerRegistry(Mapping[str, ServerConfig]):
    """Servers by name; ``get_server`` raises UnknownServer."""

    def __init__(self, servers: list[ServerConfig] | tuple[ServerConfig, ...] = ()) -> None:
        self._by_name = {s.name: s for s in servers}
        self._by_key = {s.key: s for s in servers}

    def __getitem__(self, name: str) -> ServerConfig:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def get_server(self, name: str) -> ServerConfig:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownServer(unknown_server_message(name, list(self._by_name))) from None

    def by_key(self, key: str) -> ServerConfig | None:
        return self._by_key.get(key)


def unknown_server_message(name: str, known: list[str]) -> str:
    """Say what to do: with no servers at all, the servers file is the thing to set.

    ``name`` is what the caller submitted: it is never repeated back (issue 12).
    """
    del name
    if not known:
        return ("unknown server: no servers are configured "
                "(set CREDBROKER_SERVERS_FILE to a servers file; check it with `credbroker servers check FILE`)")
    shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
    return f"unknown server (configured: {shown})"


# Loading and validation. Rules and messages are in ``server_config``.

_AUTH_FIELDS = frozenset(
    {
        "mode", "token_endpoint", "authorization_endpoint", "revocation_endpoint",
        "issuer", "client_id", "client_secret", "client_secret_env", "client_auth",
        "scopes", "resource", "audience", "requested_token_type", "header", "header_format",
        "refresh_scope", "default_lifetime_seconds", "refresh_token_idle_seconds",
        "provider", "extra_authorize_params", "idp_token_endpoint", "idp_client_id",
        "idp_client_secret", "idp_client_secret_env", *PARAM_KEYS, *ASSERTION_KEYS, "discovery_hosts",
    }
)
# mcpproxy protocols that speak HTTP; "stdio" is refused with its own message.
_HTTP_PROTOCOLS = frozenset({"http", "sse", "streamable-http", "streamable_http", "auto"})


def _endpoint(raw: Mapping[str, object], key: str, label: str) -> str | None:
    field = f"auth_broker.{key}"
    value = optional_str(raw, key, label, field)
    if value is None:
        return None
    check_url(value, label, field, https=True)
    if key == "issuer" and "?" in value:  # RFC 8414 §2: no query or fragment
        raise field_error(label, field, "must not contain a query")
    return value


_HOST_RE = re.compile(r"^[a-z0-9.-]{1,253}(:[0-9]{1,5})?$|^\[[0-9a-f:]+\](:[0-9]{1,5})?$")


def _hosts(raw: Mapping[str, object], label: str) -> tuple[str, ...]:
    value = raw.get("discovery_hosts")
    if value is None:
        return ()
    field = "auth_broker.discovery_hosts"
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise field_error(label, field, "must be a list of host names")
    hosts = tuple(h.strip().lower() for h in value)
    if not all(_HOST_RE.match(h) for h in hosts):
        raise field_error(label, field, "each entry must be a bare host name (optionally :port), no scheme or path")
    return hosts


def _client_secret(raw: Mapping[str, object], label: str, environ: Mapping[str, str],
                   key: str = "client_secret") -> Secret | None:
    inline, env_name = raw.get(key), raw.get(f"{key}_env")
    if inline is not None and env_name is not None:
        raise field_error(label, f"auth_broker.{key}", f"give {key} or {key}_env, not both")
    if inline is not None:
        if not isinstance(inline, str) or not inline:
            raise field_error(label, f"auth_broker.{key}", "must be a non-empty string")
        return Secret(inline)
    if env_name is None:
        return None
    field = f"auth_broker.{key}_env"
    name = check_env_name(env_name, label, field)
    value = environ.get(name)
    if not value:
        raise field_error(label, field, f"environment variable {name!r} is not set or empty")
    return Secret(value)


def _positive_seconds(raw: Mapping[str, object], key: str, label: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10 * 365 * 86400:
        raise field_error(label, f"auth_broker.{key}", "must be a whole number of seconds between 1 and 10 years")
    return value


def _choice(enum: type[Mode] | type[ClientAuth] | type[RefreshScope], value: object, label: str, field: str) -> object:
    try:
        return enum(value)
    except (ValueError, TypeError):
        choices = ", ".join(member.value for member in enum)
        raise field_error(label, field, f"must be one of {choices}") from None


def _auth_broker(raw: object, label: str, environ: Mapping[str, str]) -> AuthBrokerConfig:
    if raw is None:
        raise field_error(label, "auth_broker", "required (how this server's credentials are obtained)")
    if not isinstance(raw, Mapping):
        raise field_error(label, "auth_broker", "must be a mapping")
    unknown = sorted(str(k) for k in raw if k not in _AUTH_FIELDS)
    if unknown:  # a typo must not silently drop a setting
        hints = [m for k in unknown for m in difflib.get_close_matches(k, _AUTH_FIELDS, 1)]
        hint = f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""
        raise field_error(label, "auth_broker", f"unknown field(s) {', '.join(map(repr, unknown))}{hint}")
    provider = raw.get("provider")
    raw = expand_auth_broker(raw, label)  # the profile's fills under the explicit keys
    mode = Mode(_choice(Mode, raw.get("mode"), label, "auth_broker.mode"))
    client_auth = ClientAuth(
        _choice(ClientAuth, raw.get("client_auth") or ClientAuth.CLIENT_SECRET_POST, label, "auth_broker.client_auth")
    )
    issuer = _endpoint(raw, "issuer", label)
    token_endpoint = _endpoint(raw, "token_endpoint", label)
    authorization_endpoint = _endpoint(raw, "authorization_endpoint", label)
    revocation_endpoint = _endpoint(raw, "revocation_endpoint", label)
    client_id = optional_str(raw, "client_id", label, "auth_broker.client_id")
    secret = _client_secret(raw, label, environ)
    resource = optional_str(raw, "resource", label, "auth_broker.resource")
    if resource is not None:
        check_resource(resource, label, "auth_broker.resource")

    if token_endpoint is None and issuer is None:
        raise field_error(label, "auth_broker.token_endpoint", "required (or give issuer for discovery)")
    if mode is Mode.OAUTH_CONNECT:
        if authorization_endpoint is None and issuer is None:
            raise field_error(
                label, "auth_broker.authorization_endpoint",
                "required for oauth_connect (or give issuer for discovery)",
            )
        if client_id is None:
            raise field_error(label, "auth_broker.client_id", "required for oauth_connect")
    idp_token_endpoint = _endpoint(raw, "idp_token_endpoint", label)
    idp_client_id = optional_str(raw, "idp_client_id", label, "auth_broker.idp_client_id")
    idp_secret = _client_secret(raw, label, environ, "idp_client_secret")
    if mode is Mode.IDENTITY_ASSERTION:
        if idp_token_endpoint is None:
            raise field_error(label, "auth_broker.idp_token_endpoint",
                              "required for identity_assertion (the enterprise IdP's token endpoint)")
        if client_id is None:
            raise field_error(label, "auth_broker.client_id", "required for identity_assertion")
        if issuer is None and raw.get("audience") is None:
            raise field_error(label, "auth_broker.issuer",
                              "required for identity_assertion (the ID-JAG audience), or give audience")
    if idp_secret is not None and idp_client_id is None:
        raise field_error(label, "auth_broker.idp_client_id", "required when an idp client secret is given")
    if mode is Mode.ENTRA_OBO and client_id is None:
        raise field_error(label, "auth_broker.client_id", "required for entra_obo")
    if secret is not None and client_id is None:
        raise field_error(label, "auth_broker.client_id", "required when a client secret is given")
    if client_auth is ClientAuth.CLIENT_SECRET_BASIC and secret is None:
        raise field_error(label, "auth_broker.client_auth", "client_secret_basic requires a client secret")
    private_key_jwt = client_auth is ClientAuth.PRIVATE_KEY_JWT
    if private_key_jwt and client_id is None:
        raise field_error(label, "auth_broker.client_id", "required for private_key_jwt")
    if private_key_jwt and secret is not None:
        raise field_error(label, "auth_broker.client_secret", "not used with private_key_jwt (give one or the other)")
    assertion_key = parse_assertion_key(raw, label, environ, private_key_jwt=private_key_jwt)
    dpop = parse_dpop(raw, label)

    def text(key: str) -> str | None:
        return optional_str(raw, key, label, f"auth_broker.{key}")

    return AuthBrokerConfig(
        mode=mode,
        token_endpoint=token_endpoint,
        authorization_endpoint=authorization_endpoint,
        revocation_endpoint=revocation_endpoint,
        issuer=issuer,
        client_id=client_id,
        client_secret=secret,
        client_auth=client_auth,
        scopes=parse_scopes(raw.get("scopes"), label, "auth_broker.scopes"),
        resource=resource,
        audience=text("audience"),
        requested_token_type=text("requested_token_type") or ACCESS_TOKEN_TYPE,
        header=check_header(text("header"), label, "auth_broker.header"),
        header_format=check_header_format(
            text("header_format") or (DPOP_HEADER_FORMAT if dpop else None), label, "auth_broker.header_format"
        ),
        refresh_scope=RefreshScope(
            _choice(RefreshScope, raw.get("refresh_scope") or RefreshScope.OMIT, label, "auth_broker.refresh_scope")
        ),
        default_lifetime_seconds=_positive_seconds(raw, "default_lifetime_seconds", label),
        refresh_token_idle_seconds=_positive_seconds(raw, "refresh_token_idle_seconds", label),
        provider=provider,
        extra_authorize_params=parse_authorize_params(
            raw.get("extra_authorize_params"), label, "auth_broker.extra_authorize_params"
        ),
        authorize_scope_param=str(raw.get("authorize_scope_param") or "scope"),
        client_assertion_key=assertion_key,
        client_assertion_aud=parse_assertion_aud(raw, label, issuer),
        dpop=dpop,
        discovery_hosts=_hosts(raw, label),
        idp_token_endpoint=idp_token_endpoint,
        idp_client_id=idp_client_id,
        idp_client_secret=idp_secret,
    )


def _discovered_auth_broker(entry: Mapping[str, object], url: str, label: str) -> AuthBrokerConfig:
    """``discover: mcp``: only name and url are given; the rest is found at run time."""
    value = entry.get("discover")
    if value != Discover.MCP.value:
        raise field_error(label, "discover", "must be 'mcp'")
    check_url(url, label, "url", https=True)
    raw = entry.get("auth_broker") or {}
    if not isinstance(raw, Mapping):
        raise field_error(label, "auth_broker", "must be a mapping")
    allowed = {"mode", "scopes", "header", "header_format"}
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise field_error(label, "auth_broker", f"with discover: mcp only {', '.join(sorted(allowed))} "
                          f"may be given (not {', '.join(map(repr, unknown))})")
    if raw.get("mode", Mode.OAUTH_CONNECT.value) != Mode.OAUTH_CONNECT.value:
        raise field_error(label, "auth_broker.mode", "discover: mcp needs oauth_connect")
    return AuthBrokerConfig(
        mode=Mode.OAUTH_CONNECT,
        resource=url,  # RFC 8707: the MCP server's canonical URL (checked against its metadata)
        scopes=parse_scopes(raw.get("scopes"), label, "auth_broker.scopes"),
        header=check_header(raw.get("header"), label, "auth_broker.header"),  # type: ignore[arg-type]
        header_format=check_header_format(raw.get("header_format"), label,  # type: ignore[arg-type]
                                          "auth_broker.header_format"),
        discover=Discover.MCP,
    )


def _server(entry: object, position: int, key_name: str | None, environ: Mapping[str, str]) -> ServerConfig:
    if not isinstance(entry, Mapping):
        raise field_error(f"server #{position}", "entry", "must be a mapping")
    if key_name is not None and entry.get("name", key_name) != key_name:
        raise field_error(f"server #{position}", "name", "differs from its mcpServers key")
    name = check_server_name(key_name if key_name is not None else entry.get("name"), position)
    label = f"server {name!r}"
    protocol = entry.get("protocol")
    if protocol is not None and not isinstance(protocol, str):
        raise field_error(label, "protocol", "must be a string")
    if protocol == "stdio" or (entry.get("command") and not entry.get("url")):
        raise field_error(label, "protocol", "stdio upstreams are not supported (the broker injects HTTP headers)")
    if protocol is not None and protocol not in _HTTP_PROTOCOLS:
        raise field_error(label, "protocol", f"must be one of {', '.join(sorted(_HTTP_PROTOCOLS))}")
    url = optional_str(entry, "url", label, "url")
    if url is None:
        raise field_error(label, "url", "required")
    check_url(url, label, "url", https=False)
    if entry.get("discover") is not None:
        return ServerConfig(name=name, url=url, auth_broker=_discovered_auth_broker(entry, url, label))
    return ServerConfig(name=name, url=url, auth_broker=_auth_broker(entry.get("auth_broker"), label, environ))


def _entries(data: object) -> list[tuple[str | None, object]]:
    """The server entries of any accepted top-level shape, with dict-form names.

    In an mcpproxy file (``mcpServers``), servers without an ``auth_broker``
    block are the gateway's own business (stdio tools, public APIs): they are
    skipped, not rejected, so the gateway's config file can be used as is.
    """
    if data is None:
        return []
    if isinstance(data, Mapping):
        present = [k for k in ("servers", "mcpServers") if k in data]
        if len(present) != 1:
            raise ConfigError("servers file: expected one top-level 'servers' or 'mcpServers' key")
        mcpproxy = present[0] == "mcpServers"
        data = data[present[0]]
        if data is None:
            return []
        if isinstance(data, Mapping):
            entries: list[tuple[str | None, object]] = [(str(k), v) for k, v in data.items()]
        elif isinstance(data, list):
            entries = [(None, v) for v in data]
        else:
            raise ConfigError("servers file: expected a list of servers, or 'servers' / 'mcpServers'")
        if mcpproxy:
            entries = [(k, v) for k, v in entries if not (isinstance(v, Mapping) and "auth_broker" not in v
                                                                 and "discover" not in v)]
        return entries
    if isinstance(data, list):
        return [(None, v) for v in data]
    raise ConfigError("servers file: expected a list of servers, or 'servers' / 'mcpServers'")


def parse_servers(data: object, environ: Mapping[str, str] | None = None) -> ServerRegistry:
    """Validate decoded server config (any accepted shape) into a registry.

    ``environ`` (default ``os.environ``) supplies ``client_secret_env`` values,
    so a config file need hold no secret.
    """
    servers, errors = check_servers(data, environ)
    if errors:
        raise errors[0]
    return ServerRegistry(servers)


def check_servers(data: object, environ: Mapping[str, str] | None = None) -> tuple[list[ServerConfig],
                                                                                  list[ConfigError]]:
    """Every valid server and every error, so one check reports all that is wrong at once."""
    env = os.environ if environ is None else environ
    servers: list[ServerConfig] = []
    errors: list[ConfigError] = []
    seen: dict[str, int] = {}
    for position, (key_name, entry) in enumerate(_entries(data), 1):
        try:
            server = _server(entry, position, key_name, env)
            if server.name in seen:
                raise field_error(f"server {server.name!r}", "name",
                                  f"duplicate (also server #{seen[server.name]})")
        except ConfigError as exc:
            errors.append(exc)
            continue
        seen[server.name] = position
        servers.append(server)
    return servers, errors


def _from_yaml(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # str(exc) quotes the offending line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{where}") from None


def _from_json(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def load_servers(path: str | Path, environ: Mapping[str, str] | None = None) -> ServerRegistry:
    """Read a YAML or JSON servers file (by suffix, else JSON then YAML)."""
    path = Path(path)
    data = read_servers_file(path)
    try:
        return parse_servers(data, environ)
    except ConfigError as exc:
        raise ConfigError(f"servers file {str(path)!r}: {exc.message}") from None


def read_servers_file(path: str | Path) -> object:
    """The decoded content of a YAML or JSON servers file (by suffix, else JSON then YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "cannot be read"
        raise ConfigError(f"servers file {str(path)!r}: {reason}") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = _from_yaml(text)
        elif suffix == ".json":
            data = _from_json(text)
        else:
            try:
                data = _from_json(text)
            except ConfigError:
                data = _from_yaml(text)
        return data
    except ConfigError as exc:
        raise ConfigError(f"servers file {str(path)!r}: {exc.message}") from None


def servers_from_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> ServerRegistry:
    """The configured servers: empty when ``SERVERS_FILE`` is unset."""
    if settings.servers_file is None:
        return ServerRegistry()
    return load_servers(settings.servers_file, environ)
