"""MCP authorization discovery from a server URL alone (RFC 9728, RFC 8414, RFC 7591).

probe the URL unauthenticated -> 401 ``WWW-Authenticate: Bearer
resource_metadata="..."`` (or the well-known fallback) -> protected resource
metadata (its ``resource`` must be the URL) -> the first authorization
server's RFC 8414 (or OIDC) metadata (its ``issuer`` must match) -> S256 in
``code_challenge_methods_supported`` (the MCP spec requires it). Every URL a
document names passes the SSRF rules of ``discovery.check_discovered_endpoint``.

Parsing is pure; ``discover`` takes the fetch functions, so it is tested
against real servers and against canned documents alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError, UpstreamError
from ..server_config import is_loopback
from .discovery import Fetch, Resolve, check_discovered_endpoint, metadata_urls

__all__ = [
    "Discovered",
    "PostJson",
    "discover",
    "parse_www_authenticate",
    "protected_resource_urls",
    "registration_body",
    "parse_registration",
    "Registered",
    "CLIENT_METADATA_PATH",
    "client_metadata_url",
    "client_metadata_document",
]

# Where the API serves the broker's Client ID Metadata Document; its URL is the client_id.
CLIENT_METADATA_PATH = "/v1/oauth/client-metadata.json"

# POST a JSON body -> (status, headers, body)
PostJson = Callable[[str, Mapping[str, Any]], tuple[int, Mapping[str, str], bytes]]

_PARAM_RE = re.compile(r'([A-Za-z0-9_\-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_AS_FIELDS = ("authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint")


@dataclass(frozen=True)
class Discovered:
    """What a server URL led to; no secret in here (printed by ``servers discover``)."""

    resource: str
    resource_metadata_url: str
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None = None
    revocation_endpoint: str | None = None
    scopes_supported: tuple[str, ...] = ()
    token_endpoint_auth_methods: tuple[str, ...] = ()
    client_id_metadata_document_supported: bool = False
    code_challenge_methods: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Discovered:
        names = cls.__dataclass_fields__
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})


def parse_www_authenticate(value: str | None) -> str | None:
    """The ``resource_metadata`` parameter of a Bearer challenge (RFC 9728 §5.1), if any."""
    if not value:
        return None
    for name, quoted, bare in _PARAM_RE.findall(value):
        if name.lower() == "resource_metadata":
            return (quoted.replace('\\"', '"') if quoted else bare) or None
    return None


def protected_resource_urls(url: str) -> tuple[str, ...]:
    """RFC 9728 §3.1 well-known URLs: inserted before the path, then at the root."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    first = urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-protected-resource" + path, "", ""))
    root = urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-protected-resource", "", ""))
    return (first,) if first == root else (first, root)


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _check_elsewhere(field_name: str, url: str, origin: str, resolve: Resolve | None) -> str:
    """A URL that may be on another host than ``origin`` (the AS of an MCP server).

    The SSRF rules apply with the URL as its own issuer (https, public
    addresses); a loopback target is accepted only when ``origin`` is loopback.
    """
    check_discovered_endpoint(field_name, url, url, (), resolve)
    host = urlsplit(url).hostname or ""
    if is_loopback(host) and not is_loopback(urlsplit(origin).hostname or ""):
        raise ConfigError(f"discovered {field_name} is on loopback but the server is not")
    return url


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def discover(url: str, fetch: Fetch, *, resolve: Resolve | None = None) -> Discovered:
    """Follow an MCP server URL to its authorization server; UpstreamError/ConfigError when unusable."""
    status, headers, _body = fetch(url)
    candidates: list[str] = []
    pointed = parse_www_authenticate(headers.get("www-authenticate")) if status == 401 else None
    if pointed:
        candidates.append(check_discovered_endpoint("resource_metadata", pointed, url, (), resolve))
    candidates += [u for u in protected_resource_urls(url) if u not in candidates]
    prm: dict[str, Any] | None = None
    prm_url = ""
    for candidate in candidates:
        got, _h, body = fetch(candidate)
        if 200 <= got < 300 and (prm := _json(body)) is not None:
            prm_url = candidate
            break
    if prm is None:
        raise UpstreamError("protected resource metadata (RFC 9728) not found for the server URL", status=status)
    resource = prm.get("resource")
    if not isinstance(resource, str) or not _same_url(resource, url):
        raise UpstreamError("protected resource metadata names another resource than the server URL")
    servers = _strings(prm.get("authorization_servers"))
    if not servers:
        raise UpstreamError("protected resource metadata lists no authorization server")
    issuer = _check_elsewhere("authorization_servers", servers[0], url, resolve)
    meta: dict[str, Any] | None = None
    for candidate in metadata_urls(issuer):
        got, _h, body = fetch(candidate)
        if 200 <= got < 300 and (meta := _json(body)) is not None:
            break
        meta = None
    if meta is None:
        raise UpstreamError("authorization server metadata not found")
    published = meta.get("issuer")
    if not isinstance(published, str) or not _same_url(published, issuer):
        raise UpstreamError("authorization server metadata issuer does not match the authorization server")
    methods = _strings(meta.get("code_challenge_methods_supported"))
    if "S256" not in methods:
        raise UpstreamError("authorization server does not advertise PKCE S256 (required by MCP)")
    endpoints: dict[str, str | None] = {}
    for name in _AS_FIELDS:
        value = meta.get(name)
        if value is None:
            endpoints[name] = None
            continue
        if not isinstance(value, str):
            raise UpstreamError(f"authorization server metadata has an invalid {name}")
        endpoints[name] = check_discovered_endpoint(name, value, issuer, (), resolve)
    if not endpoints["authorization_endpoint"] or not endpoints["token_endpoint"]:
        raise UpstreamError("authorization server metadata lacks an authorization or token endpoint")
    return Discovered(
        resource=resource,
        resource_metadata_url=prm_url,
        issuer=issuer,
        authorization_endpoint=endpoints["authorization_endpoint"],  # type: ignore[arg-type]
        token_endpoint=endpoints["token_endpoint"],  # type: ignore[arg-type]
        registration_endpoint=endpoints["registration_endpoint"],
        revocation_endpoint=endpoints["revocation_endpoint"],
        scopes_supported=_strings(prm.get("scopes_supported")) or _strings(meta.get("scopes_supported")),
        token_endpoint_auth_methods=_strings(meta.get("token_endpoint_auth_methods_supported")),
        client_id_metadata_document_supported=meta.get("client_id_metadata_document_supported") is True,
        code_challenge_methods=methods,
    )


@dataclass(frozen=True, repr=False)
class Registered:
    """A dynamically registered client; ``client_secret`` is secret (``repr`` redacted)."""

    client_id: str
    client_secret: str | None
    auth_method: str

    def __repr__(self) -> str:
        return f"Registered(auth_method={self.auth_method!r})"


def client_metadata_url(public_url: str) -> str | None:
    """The Client ID Metadata Document URL under ``PUBLIC_URL``; None where it cannot be one.

    A client id URL must be https with a path (plain http tolerated on loopback, for tests).
    """
    parts = urlsplit(public_url.rstrip("/"))
    if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname or "")):
        return None
    return public_url.rstrip("/") + CLIENT_METADATA_PATH


def client_metadata_document(public_url: str, redirect_uri: str) -> dict[str, Any]:
    """The document served at ``client_metadata_url``: a public client using PKCE."""
    return {
        "client_id": client_metadata_url(public_url),
        "client_name": "credential-broker",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


def registration_body(found: Discovered, redirect_uri: str, scopes: tuple[str, ...]) -> dict[str, Any]:
    """RFC 7591 §2 client metadata: a confidential web client when the server allows it."""
    methods = found.token_endpoint_auth_methods
    auth = "client_secret_post" if not methods or "client_secret_post" in methods else (
        "client_secret_basic" if "client_secret_basic" in methods else "none")
    body: dict[str, Any] = {
        "client_name": "credential-broker",
        "application_type": "web",  # a server-side client with an http(s) redirect URI
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": auth,
    }
    if scopes:
        body["scope"] = " ".join(scopes)
    return body


def parse_registration(status: int, body: bytes, requested_auth: str) -> Registered:
    """The registration response (RFC 7591 §3.2.1); errors carry no body text."""
    data = _json(body)
    if not 200 <= status < 300 or data is None:
        code = data.get("error") if data else None
        safe = code if code in ("invalid_redirect_uri", "invalid_client_metadata", "invalid_software_statement",
                                "unapproved_software_statement") else None
        raise UpstreamError("dynamic client registration failed", status=status, oauth_error=safe)
    client_id = data.get("client_id")
    secret = data.get("client_secret")
    if not isinstance(client_id, str) or not client_id:
        raise UpstreamError("dynamic client registration returned no client_id", status=status)
    auth = data.get("token_endpoint_auth_method")
    auth = auth if isinstance(auth, str) else requested_auth
    return Registered(client_id, secret if isinstance(secret, str) and secret else None, auth)
