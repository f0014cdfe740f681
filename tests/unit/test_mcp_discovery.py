"""Discovery from an MCP server URL (canned documents) and the registration single flight (real DB)."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest

from broker.errors import ConfigError, UpstreamError
from broker.oauth.mcp_discovery import (
    Discovered,
    Registered,
    discover,
    parse_registration,
    parse_www_authenticate,
    protected_resource_urls,
    registration_body,
)
from broker.registrations import RegistrationStore
from broker.servers import Discover, Mode, parse_servers
from tests.conftest import make_keyring

MCP = "https://mcp.example.com/mcp"
PRM = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
AS = "https://auth.example.com"
PUBLIC = {"mcp.example.com": ["93.184.216.34"], "auth.example.com": ["93.184.216.35"]}


def resolve(host: str) -> list[str]:
    return PUBLIC.get(host, ["10.0.0.7"])


def documents(**changes: Any) -> dict[str, tuple[int, dict[str, str], bytes]]:
    prm = {"resource": MCP, "authorization_servers": [AS], "scopes_supported": ["mcp:tools"]}
    meta = {"issuer": AS, "authorization_endpoint": f"{AS}/authorize", "token_endpoint": f"{AS}/token",
            "registration_endpoint": f"{AS}/register", "code_challenge_methods_supported": ["S256"]}
    prm.update(changes.get("prm", {}))
    meta.update(changes.get("meta", {}))
    pointer = changes.get("pointer", f'Bearer error="invalid_token", resource_metadata="{PRM}"')
    return {
        MCP: (401, {"www-authenticate": pointer} if pointer else {}, b""),
        PRM: (200, {}, json.dumps(prm).encode()),
        f"{AS}/.well-known/oauth-authorization-server": (200, {}, json.dumps(meta).encode()),
    }


def fetcher(docs: dict[str, tuple[int, dict[str, str], bytes]], seen: list[str] | None = None):  # type: ignore[no-untyped-def]
    def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
        if seen is not None:
            seen.append(url)
        return docs.get(url, (404, {}, b""))
    return fetch


def test_follows_the_401_pointer_to_the_authorization_server() -> None:
    seen: list[str] = []
    found = discover(MCP, fetcher(documents(), seen), resolve=resolve)
    assert seen == [MCP, PRM, f"{AS}/.well-known/oauth-authorization-server"]
    assert (found.resource, found.issuer, found.token_endpoint) == (MCP, AS, f"{AS}/token")
    assert found.registration_endpoint == f"{AS}/register" and found.scopes_supported == ("mcp:tools",)
    assert Discovered.from_dict(json.loads(json.dumps(found.to_dict()))) == found


def test_well_known_fallback_without_a_pointer() -> None:
    assert discover(MCP, fetcher(documents(pointer="")), resolve=resolve).issuer == AS
    assert protected_resource_urls(MCP) == (PRM, "https://mcp.example.com/.well-known/oauth-protected-resource")


@pytest.mark.parametrize(("changes", "error", "words"), [
    ({"meta": {"code_challenge_methods_supported": ["plain"]}}, UpstreamError, "S256"),
    ({"meta": {"code_challenge_methods_supported": None}}, UpstreamError, "S256"),
    ({"prm": {"resource": "https://other.example.com/mcp"}}, UpstreamError, "another resource"),
    ({"meta": {"issuer": "https://evil.example.com"}}, UpstreamError, "issuer"),
    ({"meta": {"token_endpoint": "https://evil.example.com/token"}}, ConfigError, "issuer's host"),
    ({"meta": {"token_endpoint": "http://auth.example.com/token"}}, ConfigError, "https"),
    ({"prm": {"authorization_servers": ["http://127.0.0.1:9000"]}}, ConfigError, "loopback"),
    ({"prm": {"authorization_servers": ["https://internal.example.com"]}}, ConfigError, "private"),
    ({"pointer": 'Bearer resource_metadata="https://169.254.169.254/latest"'}, ConfigError, "issuer's host"),
])
def test_refuses_what_mcp_or_the_ssrf_rules_forbid(changes: dict[str, Any], error: type[Exception],
                                                   words: str) -> None:
    with pytest.raises(error, match=words) as info:
        discover(MCP, fetcher(documents(**changes)), resolve=resolve)
    assert "evil" not in str(info.value) and "169.254" not in str(info.value)  # never quotes the document


def test_www_authenticate_parsing() -> None:
    assert parse_www_authenticate('Bearer realm="x", resource_metadata="https://a/b?c=1"') == "https://a/b?c=1"
    assert parse_www_authenticate("Bearer resource_metadata=https://a/b") == "https://a/b"
    assert parse_www_authenticate('Bearer error="invalid_token"') is None and parse_www_authenticate(None) is None


def test_registration_body_and_response() -> None:
    found = discover(MCP, fetcher(documents()), resolve=resolve)
    body = registration_body(found, "https://broker.example/v1/connect/callback", found.scopes_supported)
    assert body["redirect_uris"] == ["https://broker.example/v1/connect/callback"]
    assert body["grant_types"] == ["authorization_code", "refresh_token"] and body["scope"] == "mcp:tools"
    reg = parse_registration(201, b'{"client_id": "c1", "client_secret": "s3cr3t-value"}', "client_secret_post")
    assert (reg.client_id, reg.client_secret, reg.auth_method) == ("c1", "s3cr3t-value", "client_secret_post")
    assert "s3cr3t" not in repr(reg)
    with pytest.raises(UpstreamError) as info:
        parse_registration(400, b'{"error": "invalid_redirect_uri", "error_description": "s3cr3t"}', "none")
    assert info.value.oauth_error is None or info.value.oauth_error == "invalid_redirect_uri"
    assert "s3cr3t" not in str(info.value)


def test_servers_file_entry_with_only_name_url_discover() -> None:
    cfg = parse_servers({"servers": [{"name": "m", "url": MCP, "discover": "mcp"}]})["m"].auth_broker
    assert (cfg.mode, cfg.discover, cfg.resource, cfg.client_id) == (Mode.OAUTH_CONNECT, Discover.MCP, MCP, None)
    with pytest.raises(ConfigError, match="discover"):
        parse_servers({"servers": [{"name": "m", "url": MCP, "discover": "oidc"}]})
    with pytest.raises(ConfigError, match="https"):
        parse_servers({"servers": [{"name": "m", "url": "http://mcp.example.com/mcp", "discover": "mcp"}]})
    with pytest.raises(ConfigError, match="token_endpoint"):
        parse_servers({"servers": [{"name": "m", "url": MCP, "discover": "mcp",
                                    "auth_broker": {"token_endpoint": f"{AS}/token"}}]})


def test_twenty_threads_register_once_and_a_forgotten_client_once_more(engine) -> None:  # type: ignore[no-untyped-def]
    found = discover(MCP, fetcher(documents()), resolve=resolve)
    calls: list[int] = []
    gate = threading.Event()

    def work() -> tuple[Discovered, Registered]:
        calls.append(1)
        gate.wait(5)  # hold the claim while the others arrive
        return found, Registered(f"client-{len(calls)}", "secret-value-xyz", "client_secret_post")

    keyring = make_keyring("k1")
    key = f"key-{uuid.uuid4().hex}"  # the PostgreSQL database lives for the whole session
    store = RegistrationStore(engine, keyring)
    results: list[str] = []

    def first() -> None:
        results.append(store.get_or_register(key, work).client.client_id)

    threads = [threading.Thread(target=first) for _ in range(20)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and results == ["client-1"] * 20

    again = RegistrationStore(engine, keyring)  # another process after a restart
    reg = again.get(key)
    assert reg is not None and reg.client.client_secret == "secret-value-xyz" and reg.discovered == found
    assert again.forget(key, reg.generation) and not again.forget(key, reg.generation)
    assert store.get_or_register(key, work).client.client_id == "client-2" and len(calls) == 2
    # Sealed: under another key it does not open (and is registered afresh on next use).
    assert RegistrationStore(engine, make_keyring("other")).get(key) is None


def test_a_failed_discovery_is_answered_from_the_row_then_retried(engine, clock) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def failing() -> tuple[Discovered, Registered]:
        calls.append(1)
        raise UpstreamError("authorization server does not advertise PKCE S256 (required by MCP)")

    store = RegistrationStore(engine, make_keyring("k1"), clock=clock, failure_seconds=10)
    key = f"key-{uuid.uuid4().hex}"
    for _ in range(5):
        with pytest.raises(UpstreamError, match="S256"):
            store.get_or_register(key, failing)
    assert len(calls) == 1  # the four others got the recorded answer
    clock.advance(11)
    with pytest.raises(UpstreamError):
        store.get_or_register(key, failing)
    assert len(calls) == 2


def test_rotate_keys_moves_registered_clients_to_the_new_key(engine) -> None:  # type: ignore[no-untyped-def]
    """rotate-keys covers dynamically registered clients: after it, the old key
    can be dropped and the client is still known (no re-registration, no forced
    reconnect of the users connected through it)."""
    from broker.crypto import Keyring

    found = discover(MCP, fetcher(documents()), resolve=resolve)
    old = make_keyring("old")
    key = f"key-{uuid.uuid4().hex}"
    RegistrationStore(engine, old).get_or_register(
        key, lambda: (found, Registered("client-1", "secret-value-xyz", "client_secret_post")))
    new = Keyring(make_keyring("new").keys + old.keys)  # the new key first, the old one still readable
    rotating = RegistrationStore(engine, new)
    assert rotating.count_stale_keys() >= 1
    rewritten, unreadable = rotating.reencrypt()
    assert rewritten >= 1 and unreadable == 0 and rotating.count_stale_keys() == 0
    only_new = RegistrationStore(engine, Keyring(new.keys[:1]))
    kept = only_new.get(key)
    assert kept is not None and kept.client.client_id == "client-1"
