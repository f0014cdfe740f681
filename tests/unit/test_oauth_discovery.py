"""RFC 8414 / OIDC discovery, issuer validation and the metadata cache."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping

import pytest

from broker.clock import FakeClock
from broker.errors import ConfigError, UpstreamError
from broker.oauth.discovery import (
    MetadataCache,
    is_allowed_endpoint,
    metadata_urls,
    needs_discovery,
    resolve_endpoints,
)
from broker.servers import AuthBrokerConfig, Mode

ISSUER = "https://as.example/tenant1"
RFC8414 = "https://as.example/.well-known/oauth-authorization-server/tenant1"
OIDC = "https://as.example/tenant1/.well-known/openid-configuration"


def metadata(issuer: str = ISSUER, **overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "issuer": issuer,
        "token_endpoint": "https://as.example/tenant1/token",
        "authorization_endpoint": "https://as.example/tenant1/authorize",
        "revocation_endpoint": "https://as.example/tenant1/revoke",
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


class Fetcher:
    """Serves documents by URL; everything else is a 404. Records calls."""

    def __init__(self, docs: Mapping[str, object]) -> None:
        self.docs = docs
        self.calls: list[str] = []

    def __call__(self, url: str) -> tuple[int, Mapping[str, str], bytes]:
        self.calls.append(url)
        if url not in self.docs:
            return 404, {}, b"not found"
        doc = self.docs[url]
        return 200, {}, doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def cfg(mode: Mode = Mode.TOKEN_EXCHANGE, **kw: object) -> AuthBrokerConfig:
    return AuthBrokerConfig(mode=mode, issuer=ISSUER, client_id="c", **kw)  # type: ignore[arg-type]


def test_metadata_urls() -> None:
    assert metadata_urls(ISSUER) == (RFC8414, OIDC)
    assert metadata_urls("https://as.example/") == (
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration",
    )


def test_rfc8414_fills_missing_endpoints() -> None:
    fetch = Fetcher({RFC8414: metadata()})
    resolved = resolve_endpoints(cfg(Mode.OAUTH_CONNECT), fetch)
    assert resolved.token_endpoint == "https://as.example/tenant1/token"
    assert resolved.authorization_endpoint == "https://as.example/tenant1/authorize"
    assert resolved.revocation_endpoint == "https://as.example/tenant1/revoke"
    assert fetch.calls == [RFC8414]


def test_falls_back_to_openid_configuration() -> None:
    fetch = Fetcher({OIDC: metadata()})
    assert resolve_endpoints(cfg(), fetch).token_endpoint == "https://as.example/tenant1/token"
    assert fetch.calls == [RFC8414, OIDC]


def test_malformed_rfc8414_document_also_falls_back() -> None:
    fetch = Fetcher({RFC8414: b"<html>", OIDC: metadata()})
    assert resolve_endpoints(cfg(), fetch).token_endpoint is not None


def test_configured_endpoints_win() -> None:
    fetch = Fetcher({RFC8414: metadata()})
    resolved = resolve_endpoints(
        cfg(Mode.OAUTH_CONNECT, authorization_endpoint="https://mine.example/authorize"), fetch
    )
    assert resolved.authorization_endpoint == "https://mine.example/authorize"
    assert resolved.token_endpoint == "https://as.example/tenant1/token"


def test_nothing_missing_means_no_fetch() -> None:
    fetch = Fetcher({})
    config = cfg(token_endpoint="https://as.example/token")
    assert resolve_endpoints(config, fetch) is config
    no_issuer = AuthBrokerConfig(mode=Mode.TOKEN_EXCHANGE)
    assert resolve_endpoints(no_issuer, fetch) is no_issuer
    assert fetch.calls == []


def test_revocation_lookup_only_on_request() -> None:
    config = cfg(token_endpoint="https://as.example/token")
    assert not needs_discovery(config)
    assert needs_discovery(config, also=("revocation_endpoint",))
    fetch = Fetcher({RFC8414: metadata()})
    resolved = resolve_endpoints(config, fetch, also=("revocation_endpoint",))
    assert resolved.revocation_endpoint == "https://as.example/tenant1/revoke"
    assert resolved.token_endpoint == "https://as.example/token"


def test_metadata_not_found() -> None:
    with pytest.raises(UpstreamError, match="metadata not found") as info:
        resolve_endpoints(cfg(), Fetcher({}))
    assert info.value.status == 404


def test_issuer_mismatch_is_refused() -> None:
    fetch = Fetcher({RFC8414: metadata(issuer="https://evil.example/tenant1")})
    with pytest.raises(UpstreamError, match="issuer does not match"):
        resolve_endpoints(cfg(), fetch)
    assert fetch.calls == [RFC8414]  # no fallback past a mismatch


def test_missing_issuer_in_metadata_is_refused() -> None:
    with pytest.raises(UpstreamError, match="issuer does not match"):
        resolve_endpoints(cfg(), Fetcher({RFC8414: {"token_endpoint": "https://as.example/t"}}))


def test_trailing_slash_difference_is_tolerated() -> None:
    fetch = Fetcher({RFC8414: metadata(issuer=ISSUER + "/")})
    assert resolve_endpoints(cfg(), fetch).token_endpoint is not None


@pytest.mark.parametrize(
    "endpoint",
    ["http://as.example/token", "ftp://as.example/token", "https:///token", "https://as.example/t#f", 7],
)
def test_insecure_or_invalid_endpoints_are_refused(endpoint: object) -> None:
    fetch = Fetcher({RFC8414: metadata(token_endpoint=endpoint)})
    with pytest.raises((UpstreamError, ConfigError), match="token_endpoint"):
        resolve_endpoints(cfg(), fetch)


def test_missing_required_endpoints() -> None:
    with pytest.raises(UpstreamError, match="no token_endpoint"):
        resolve_endpoints(cfg(), Fetcher({RFC8414: metadata(token_endpoint=None)}))
    with pytest.raises(UpstreamError, match="no authorization_endpoint"):
        resolve_endpoints(cfg(Mode.OAUTH_CONNECT), Fetcher({RFC8414: metadata(authorization_endpoint=None)}))


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://as.example/token", True),
        ("http://127.0.0.1:8080/token", True),
        ("http://[::1]/token", True),
        ("http://localhost:9000/token", True),
        ("http://10.0.0.1/token", False),
        ("http://as.example/token", False),
        ("javascript:alert(1)", False),
        ("https://[bad/token", False),
    ],
)
def test_is_allowed_endpoint(url: str, allowed: bool) -> None:
    assert is_allowed_endpoint(url) is allowed


def test_insecure_issuer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="issuer"):
        resolve_endpoints(
            AuthBrokerConfig(mode=Mode.TOKEN_EXCHANGE, issuer="http://as.example"), Fetcher({})
        )


def test_loopback_http_issuer_is_allowed() -> None:
    issuer = "http://127.0.0.1:9000"
    fetch = Fetcher({
        "http://127.0.0.1:9000/.well-known/oauth-authorization-server":
            metadata(issuer=issuer, token_endpoint="http://127.0.0.1:9000/token", authorization_endpoint=None,
                     revocation_endpoint=None),
    })
    resolved = resolve_endpoints(AuthBrokerConfig(mode=Mode.TOKEN_EXCHANGE, issuer=issuer), fetch)
    assert resolved.token_endpoint == "http://127.0.0.1:9000/token"


def test_cache_avoids_refetching_until_ttl() -> None:
    clock = FakeClock()
    cache = MetadataCache(ttl=60, clock=clock)
    fetch = Fetcher({RFC8414: metadata()})
    for _ in range(3):
        resolve_endpoints(cfg(), fetch, cache)
    assert fetch.calls == [RFC8414]
    clock.advance(61)
    resolve_endpoints(cfg(), fetch, cache)
    assert fetch.calls == [RFC8414, RFC8414]


def test_cache_is_per_issuer_and_bounded() -> None:
    cache = MetadataCache(ttl=60, clock=FakeClock(), max_entries=2)
    cache.put("https://a.example", {"token_endpoint": "https://a.example/t"})
    cache.put("https://b.example", {"token_endpoint": "https://b.example/t"})
    cache.put("https://c.example", {"token_endpoint": "https://c.example/t"})
    assert cache.get("https://a.example") is None
    assert cache.get("https://c.example") == {"token_endpoint": "https://c.example/t"}
    returned = cache.get("https://b.example")
    assert returned is not None
    returned["token_endpoint"] = "https://evil.example/"  # a copy: the cache is unchanged
    assert cache.get("https://b.example") == {"token_endpoint": "https://b.example/t"}
    cache.clear()
    assert cache.get("https://b.example") is None


def test_cache_is_thread_safe() -> None:
    cache = MetadataCache(ttl=60, clock=FakeClock(), max_entries=8)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(500):
                cache.put(f"https://{(n + i) % 16}.example", {"token_endpoint": "https://x.example/t"})
                cache.get(f"https://{i % 16}.example")
        except BaseException as exc:  # pragma: no cover - the assertion reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- SSRF: where discovered endpoints may point ----------------------------------------------------


@pytest.mark.parametrize(("endpoint", "why"), [
    ("http://localhost:6379/", "https"),                    # loopback, plain http (Redis)
    ("https://localhost:6379/", "issuer's host"),           # loopback, another host
    ("https://127.0.0.1/token", "issuer's host"),
    ("https://169.254.169.254/latest/meta-data", "issuer's host"),  # link-local (cloud metadata)
    ("https://10.0.0.5/token", "issuer's host"),            # private
    ("https://192.168.1.10/token", "issuer's host"),
    ("https://[fd00::1]/token", "issuer's host"),
    ("https://other.example/token", "issuer's host"),       # a public host, but not the issuer's
    ("https://as.example:6379/token", "issuer's host"),     # the issuer's name, another port
])
def test_discovered_endpoints_off_the_issuers_host_are_refused(endpoint: str, why: str) -> None:
    fetch = Fetcher({RFC8414: metadata(token_endpoint=endpoint)})
    with pytest.raises(ConfigError, match=why) as info:
        resolve_endpoints(cfg(), fetch)
    assert "token_endpoint" in info.value.message and endpoint not in info.value.message


@pytest.mark.parametrize(("host", "why"), [
    ("meta.example", "loopback, private or link-local"),   # a name that resolves to link-local
    ("rebind.example", "loopback, private or link-local"),  # one of its addresses is private
    ("nowhere.example", "does not resolve"),
])
def test_the_resolved_address_is_checked_not_only_the_name(host: str, why: str) -> None:
    issuer = f"https://{host}"
    doc = {"issuer": issuer, "token_endpoint": f"{issuer}/token"}
    fetch = Fetcher({f"{issuer}/.well-known/oauth-authorization-server": doc})
    config = AuthBrokerConfig(mode=Mode.TOKEN_EXCHANGE, issuer=issuer, client_id="c")
    with pytest.raises(ConfigError, match=why):
        resolve_endpoints(config, fetch)


def test_an_allow_listed_host_may_serve_endpoints() -> None:
    fetch = Fetcher({RFC8414: metadata(token_endpoint="https://other.example/oauth/token")})
    listed = cfg(discovery_hosts=("other.example",))
    assert resolve_endpoints(listed, fetch).token_endpoint == "https://other.example/oauth/token"
    assert resolve_endpoints(cfg(discovery_hosts=("other.example:443",)), fetch).token_endpoint


def test_a_loopback_issuer_may_use_loopback_endpoints() -> None:
    issuer = "http://127.0.0.1:8080"
    doc = {"issuer": issuer, "token_endpoint": f"{issuer}/token"}
    fetch = Fetcher({f"{issuer}/.well-known/oauth-authorization-server": doc})
    config = AuthBrokerConfig(mode=Mode.TOKEN_EXCHANGE, issuer=issuer, client_id="c")
    assert resolve_endpoints(config, fetch).token_endpoint == f"{issuer}/token"
