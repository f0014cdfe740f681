"""Server config: the upstreams, their ``auth_broker`` blocks and server keys."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from .errors import UnknownServer
from .secret import Secret

__all__ = [
    "Mode",
    "ClientAuth",
    "AuthBrokerConfig",
    "ServerConfig",
    "ServerRegistry",
    "server_key",
]

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class Mode(StrEnum):
    TOKEN_EXCHANGE = "token_exchange"
    ENTRA_OBO = "entra_obo"
    OAUTH_CONNECT = "oauth_connect"


class ClientAuth(StrEnum):
    CLIENT_SECRET_POST = "client_secret_post"
    CLIENT_SECRET_BASIC = "client_secret_basic"


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
    header: str = "Authorization"
    header_format: str = "Bearer {token}"


@dataclass(frozen=True)
class ServerConfig:
    """One upstream the gateway calls."""

    name: str
    url: str
    auth_broker: AuthBrokerConfig

    @property
    def key(self) -> str:
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
            raise UnknownServer(f"unknown server {name!r}") from None

    def by_key(self, key: str) -> ServerConfig | None:
        return self._by_key.get(key)


# Loading and validation (load_servers, parse_servers) follow below.
