"""Authorization-server metadata discovery (RFC 8414, then OpenID Connect).

Fills the endpoints a server config leaves out when it names an ``issuer``.
The metadata's ``issuer`` must match the configured one (RFC 8414 §3.3), so
a document served from the right URL but for another server is refused.

Discovered endpoints are where the client secret and tokens go, so a
metadata document must not be able to point them anywhere (SSRF): each must
be https on the issuer's host (or a host the server lists in
``auth_broker.discovery_hosts``), and its resolved addresses must not be
loopback, private or link-local unless the issuer itself is on loopback (local
development) or the host is listed. A violation is a ConfigError naming the
field, never quoting the document.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

from ..clock import Clock, SystemClock
from ..server_config import is_loopback
from ..errors import ConfigError, UpstreamError
from ..servers import AuthBrokerConfig, Mode

__all__ = [
    "Fetch",
    "MetadataCache",
    "resolve_endpoints",
    "metadata_urls",
    "is_allowed_endpoint",
    "needs_discovery",
    "Resolve",
    "system_resolve",
    "check_discovered_endpoint",
]

log = logging.getLogger(__name__)

# GET url -> (status, headers, body); TokenEndpointSender.get fits.
Fetch = Callable[[str], tuple[int, Mapping[str, str], bytes]]

_ENDPOINT_FIELDS = ("token_endpoint", "authorization_endpoint", "revocation_endpoint")

# host -> its IP addresses (empty when it does not resolve).
Resolve = Callable[[str], list[str]]


def system_resolve(host: str) -> list[str]:
    """The addresses the system resolver gives for ``host`` (empty on failure)."""
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    except (OSError, UnicodeError):
        return []


def _internal(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_multicast
            or ip.is_reserved or not ip.is_global)


def _host_port(parts: object) -> str:
    host = str(getattr(parts, "hostname", "") or "").lower()
    port = getattr(parts, "port", None) or {"https": 443, "http": 80}.get(str(getattr(parts, "scheme", "")), 0)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_discovered_endpoint(field: str, url: str, issuer: str, allowed_hosts: tuple[str, ...] = (),
                              resolve: Resolve | None = None) -> str:
    """``url`` if a discovered endpoint may be used, else ConfigError (never quoting the URL)."""
    bad = f"authorization server metadata: {field}"
    if not is_allowed_endpoint(url):
        raise ConfigError(f"{bad} is not an https URL")
    parts, issuer_parts = urlsplit(url), urlsplit(issuer)
    issuer_loopback = is_loopback(issuer_parts.hostname or "")
    if parts.scheme != "https" and not (issuer_loopback and issuer_parts.scheme == "http"):
        raise ConfigError(f"{bad} must be https")
    host = (parts.hostname or "").lower()
    listed = host in allowed_hosts or f"{host}:{parts.port or 443}" in allowed_hosts
    if _host_port(parts) != _host_port(issuer_parts) and not listed:
        raise ConfigError(f"{bad} is not on the issuer's host (list other hosts in auth_broker.discovery_hosts)")
    if issuer_loopback or listed:
        return url
    addresses = [host] if _is_ip(host) else (resolve or system_resolve)(host)
    if not addresses:
        raise ConfigError(f"{bad}: host does not resolve")
    if any(_internal(a) for a in addresses):
        raise ConfigError(f"{bad} resolves to a loopback, private or link-local address")
    return url


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_allowed_endpoint(url: str) -> bool:
    """https anywhere, plain http only on loopback (local development and tests)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if not host or parts.fragment or parts.username or parts.password:
        return False  # userinfo in a URL would be logged by httpx and sent as Basic auth
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    return is_loopback(host)


def metadata_urls(issuer: str) -> tuple[str, str]:
    """The RFC 8414 URL (well-known inserted before the path) and the OIDC URL (appended)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", ""))
    oidc = urlunsplit((parts.scheme, parts.netloc, path + "/.well-known/openid-configuration", "", ""))
    return rfc8414, oidc


def needs_discovery(cfg: AuthBrokerConfig, also: tuple[str, ...] = ()) -> bool:
    """True when an issuer is set and an endpoint this mode must have is missing.

    ``also`` names optional endpoints worth a lookup (``revocation_endpoint``
    when disconnecting); otherwise they are only filled when discovery runs
    anyway.
    """
    if not cfg.issuer:
        return False
    if not cfg.token_endpoint or any(not getattr(cfg, f) for f in also):
        return True
    return cfg.mode == Mode.OAUTH_CONNECT and not cfg.authorization_endpoint


class MetadataCache:
    """Validated endpoints per issuer, kept for ``ttl`` seconds; thread-safe."""

    def __init__(self, ttl: float = 3600.0, clock: Clock | None = None, max_entries: int = 256) -> None:
        self._ttl = ttl
        self._clock = clock or SystemClock()
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def get(self, issuer: str) -> dict[str, str] | None:
        with self._lock:
            entry = self._entries.get(issuer)
            if entry is None:
                return None
            if self._now() >= entry[0]:
                del self._entries[issuer]
                return None
            return dict(entry[1])

    def put(self, issuer: str, endpoints: Mapping[str, str]) -> None:
        with self._lock:
            if len(self._entries) >= self._max_entries and issuer not in self._entries:
                self._entries.pop(next(iter(self._entries)))  # oldest insertion
            self._entries[issuer] = (self._now() + self._ttl, dict(endpoints))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _same_issuer(a: str, b: str) -> bool:
    # RFC 8414 wants identical strings; a trailing slash is the one difference
    # seen in practice (Auth0 publishes one) and changes nothing we rely on.
    return a.rstrip("/") == b.rstrip("/")


def _fetch_metadata(issuer: str, fetch: Fetch, allowed_hosts: tuple[str, ...] = (),
                    resolve: Resolve | None = None) -> dict[str, str]:
    status = 0
    for url in metadata_urls(issuer):
        status, _headers, body = fetch(url)
        if not 200 <= status < 300:
            continue
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        published = data.get("issuer")
        if not isinstance(published, str) or not _same_issuer(published, issuer):
            raise UpstreamError("authorization server metadata issuer does not match the configured issuer")
        endpoints: dict[str, str] = {}
        for field in _ENDPOINT_FIELDS:
            value = data.get(field)
            if value is None:
                continue
            if not isinstance(value, str):
                raise UpstreamError(f"authorization server metadata has an invalid {field}")
            endpoints[field] = check_discovered_endpoint(field, value, issuer, allowed_hosts, resolve)
        return endpoints
    raise UpstreamError("authorization server metadata not found", status=status or None)


def resolve_endpoints(
    cfg: AuthBrokerConfig,
    fetch: Fetch,
    cache: MetadataCache | None = None,
    *,
    also: tuple[str, ...] = (),
    resolve: Resolve | None = None,
) -> AuthBrokerConfig:
    """``cfg`` with missing endpoints filled from the issuer's metadata.

    Configured endpoints always win. Returns ``cfg`` itself when nothing is
    missing; raises UpstreamError when metadata is needed and unusable, or
    lacks the token (or, for oauth_connect, authorization) endpoint.
    """
    if not needs_discovery(cfg, also):
        return cfg
    issuer = cfg.issuer
    assert issuer is not None
    if not is_allowed_endpoint(issuer):
        raise ConfigError("auth_broker.issuer must be an https URL (or http on loopback)")
    # Keyed by the allow-list too: what one server accepts, another may not.
    cache_key = issuer if not cfg.discovery_hosts else f"{issuer} {' '.join(cfg.discovery_hosts)}"
    endpoints = cache.get(cache_key) if cache is not None else None
    if endpoints is None:
        endpoints = _fetch_metadata(issuer, fetch, cfg.discovery_hosts, resolve)
        log.info("discovered authorization server metadata host=%s", urlsplit(issuer).hostname)
        if cache is not None:
            cache.put(cache_key, endpoints)
    missing = {f: endpoints[f] for f in _ENDPOINT_FIELDS if not getattr(cfg, f) and f in endpoints}
    resolved = replace(cfg, **missing)
    if not resolved.token_endpoint:
        raise UpstreamError("authorization server metadata has no token_endpoint")
    if resolved.mode == Mode.OAUTH_CONNECT and not resolved.authorization_endpoint:
        raise UpstreamError("authorization server metadata has no authorization_endpoint")
    return resolved
