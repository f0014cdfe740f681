"""The HTTP API over real HTTP: uvicorn on loopback in front of a real cluster
(Redis, a Celery worker process, the database, the sandbox provider).

Covers every row of the contract table, every error code with its status, the
full connect flow through the browser callback, X-Request-ID in the audit
trail, and that no response or log line carries a test secret.
"""

from __future__ import annotations

import re
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from broker.audit import SqlAuditLog
from broker.db import make_engine
from broker.models import Credential, CredentialStatus, ObtainedVia
from broker.sandbox import SandboxHandle, SandboxProvider, run_sandbox
from broker.sandbox.server import bind_socket, url_for
from broker.secret import Secret
from broker.servers import servers_from_settings
from broker.settings import Settings, load_settings
from broker.store import CredentialStore
from tests.cluster import Cluster, redis_available, wait_for
from tests.conftest import missing_service
from tests.integration.connect_browser import ConnectBrowser, form_of
from tests.secrets import assert_no_leak, register
from workers.api import create_app
from workers.auditstream import persist_audit_batch

pytestmark = pytest.mark.integration

KEY = register("cbtest-apikey-" + secrets.token_hex(12))
CLIENT_SECRET = register("sandbox-client-secret-s3cr3t")
POLICY = "tests.integration.api_policy:deny_blocked_users"


class Served:
    """An app under uvicorn on a loopback socket, in a background thread."""

    def __init__(self, app: Starlette, sock: Any = None) -> None:
        self.sock = sock if sock is not None else bind_socket("127.0.0.1", 0)
        self.url = url_for(self.sock)
        config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 15, what="the API to start")
        assert self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        self.sock.close()


class Api:
    """An HTTP client that checks every response for the contract's basics and for leaks."""

    def __init__(self, url: str, key: str | None = KEY, authorization: str | None = None) -> None:
        authorization = authorization or (f"Bearer {key}" if key else None)
        headers = {"Authorization": authorization} if authorization else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=30, trust_env=False)

    def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        r = self.http.request(method, path, **kwargs)
        assert r.headers.get("x-request-id"), path
        assert_no_leak(r.text, f"response to {method} {path}")
        assert_no_leak(str(r.headers), f"headers of {method} {path}")
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            body = r.json()
            assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
        return r

    def resolve(self, user: str, server: str, **extra: Any) -> httpx.Response:
        return self("POST", "/v1/resolve", json={"user_id": user, "server": server, **extra})

    def listing(self, user: str) -> dict[str, dict[str, Any]]:
        r = self("GET", f"/v1/users/{user}/credentials")
        assert r.status_code == 200
        return {item["server"]: item for item in r.json()}

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Env:
    cluster: Cluster
    sandbox: SandboxHandle
    served: Served
    api: Api

    @property
    def url(self) -> str:
        return self.served.url

    def sign_in(self, user: str, ttl: int = 3600, headers: dict[str, str] | None = None) -> str:
        token = register(self.sandbox.provider.issue_subject_token(user, ttl=ttl))
        expires = (datetime.now(UTC) + timedelta(seconds=ttl)).isoformat()
        r = self.api("PUT", f"/v1/users/{user}/subject-token", json={"token": token, "expires_at": expires},
                     headers=headers)
        assert r.status_code == 204 and r.content == b""
        return token

    def variant(self, **env: str) -> Settings:
        """The cluster's settings with some variables changed ("" removes one)."""
        return load_settings({**self.cluster.env, **env}, env_file=None)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    sandbox = run_sandbox(SandboxProvider())
    sock = bind_socket("127.0.0.1", 0)  # bound first: the callback URL must be known to the workers
    cluster = Cluster(tmp_path_factory.mktemp("api"), sandbox.url, extra_env={
        "CREDBROKER_API_KEYS": KEY, "CREDBROKER_PUBLIC_URL": url_for(sock), "CREDBROKER_POLICY": POLICY})
    served = None
    try:
        cluster.start_worker(concurrency=3)
        served = Served(create_app(cluster.settings), sock)
        api = Api(served.url)
        yield Env(cluster, sandbox, served, api)
        api.close()
        for req in sandbox.provider.requests():
            for field in ("subject_token", "assertion", "refresh_token", "token"):
                value = req.get("form", {}).get(field)
                if isinstance(value, str):
                    register(value)
        assert_no_leak(cluster.all_logs(), "worker logs")
    finally:
        if served is not None:
            served.stop()
        cluster.stop()
        sandbox.stop()


@pytest.fixture
def serve_variant(env: Env) -> Iterator[Any]:
    started: list[Served] = []
    clients: list[Api] = []

    def start(settings: Settings) -> Api:
        served = Served(create_app(settings))
        started.append(served)
        clients.append(Api(served.url))
        return clients[-1]

    yield start
    for client in clients:
        client.close()
    for served in started:
        served.stop()


# -- operations -------------------------------------------------------------------


def test_health_ready_metrics_openapi(env: Env) -> None:
    with Api(env.url, key=None) as open_client:
        _open_endpoints(env, open_client)


def _open_endpoints(env: Env, open_client: Api) -> None:
    assert open_client("GET", "/healthz").json() == {"status": "ok"}
    ready = open_client("GET", "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok", "worker": "ok"}}
    doc = open_client("GET", "/openapi.json").json()
    assert doc["openapi"] == "3.1.0" and "/v1/resolve" in doc["paths"]
    assert open_client("GET", "/metrics").status_code == 401
    text = env.api("GET", "/metrics").text
    assert "credbroker_http_requests_total" in text and 'route="/healthz"' in text


def test_readyz_names_the_failed_check_and_no_keys_refuses(env: Env, serve_variant: Any, tmp_path: Path,
                                                            secret_guard: Any) -> None:
    broken = env.variant(CREDBROKER_API_KEYS="",
                         CREDBROKER_DATABASE_URL=f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    api = serve_variant(broken)
    r = api("GET", "/readyz")
    assert r.status_code == 503
    assert r.json()["checks"] == {"database": "failed", "redis": "ok", "worker": "ok"}
    assert r.json()["error"] == "unavailable" and "database" in r.json()["message"]
    assert any("CREDBROKER_API_KEYS is not set" in line for line in secret_guard.lines)
    for key in (KEY, None):
        with Api(str(api.http.base_url), key=key) as client:
            refused = client.resolve("alice", "tx")
        assert refused.status_code == 401 and "no API keys configured" in refused.json()["message"]


# -- auth and input ------------------------------------------------------------------


def test_unauthorized_without_or_with_a_wrong_key(env: Env) -> None:
    wrong = register("cbtest-wrong-" + secrets.token_hex(8))
    for authorization in (None, f"Bearer {wrong}", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"):
        with Api(env.url, key=None, authorization=authorization) as client:
            for method, path in [("POST", "/v1/resolve"), ("PUT", "/v1/users/alice/subject-token"),
                                 ("GET", "/v1/users/alice/credentials"), ("GET", "/v1/audit")]:
                r = client(method, path, json={"user_id": "alice", "server": "tx"})
                assert r.status_code == 401 and r.json()["error"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
    with Api(env.url, key=None) as browser:
        callback = browser("GET", "/v1/connect/callback")  # the browser's route needs no key
    assert callback.status_code == 400


@pytest.mark.parametrize("content, field", [
    (b'{"user_id": "alice", "server": ', "body"),  # malformed JSON
    (b'["alice", "tx"]', "body"),  # wrong shape
    (b'{"user_id": 42, "server": "tx"}', "user_id"),  # wrong type
    (b'{"user_id": "alice", "server": "tx", "timeout": "1s"}', "timeout"),
    (('{"user_id": "' + "a" * 257 + '", "server": "tx"}').encode(), "user_id"),  # overlong
    (b'{"user_id": "tenant/alice", "server": "tx"}', "user_id"),  # slash
    (b'{"user_id": "al\\u0000ice", "server": "tx"}', "user_id"),  # control character
    (b'{"user_id": "alice", "server": "tx", "scope": "admin"}', "body"),  # unknown field
    (b'{"user_id": "alice", "server": "' + b"x" * 70_000 + b'"}', "body"),  # over 64 KiB
    (b'{"user_id": ' + b"[" * 50 + b"]" * 50 + b', "server": "tx"}', "body"),  # nested too deep
])
def test_invalid_request_names_the_field(env: Env, content: bytes, field: str) -> None:
    r = env.api("POST", "/v1/resolve", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" and r.json()["message"].startswith(field + ":")


def test_invalid_path_and_subject_token_input(env: Env) -> None:
    assert env.api("GET", "/v1/users/tenant%2Falice/credentials").status_code == 422
    assert env.api("GET", "/v1/users/" + "u" * 257 + "/credentials").status_code == 422
    bad = env.api("PUT", "/v1/users/alice/subject-token", json={"token": "t", "expires_at": "next week"})
    assert bad.status_code == 422 and bad.json()["message"].startswith("expires_at:")
    assert env.api("PUT", "/v1/users/alice/subject-token", json={}).json()["message"] == "token: required"


# -- the contract rows ----------------------------------------------------------------


def test_subject_token_resolve_list_delete_for_exchange_modes(env: Env) -> None:
    env.sign_in("alice")
    # unix seconds are accepted too; this replaces the token
    token = register(env.sandbox.provider.issue_subject_token("alice", ttl=3600))
    r = env.api("PUT", "/v1/users/alice/subject-token",
                json={"token": token, "expires_at": int(datetime.now(UTC).timestamp()) + 3600})
    assert r.status_code == 204
    tx = env.api.resolve("alice", "tx", timeout=20)
    assert tx.status_code == 200, tx.text
    body = tx.json()
    assert set(body) == {"server", "header", "value", "token_type", "expires_at", "obtained_via"}
    assert body["server"] == "tx" and body["header"] == "Authorization" and body["value"].startswith("Bearer ")
    assert body["obtained_via"] == "token_exchange" and datetime.fromisoformat(body["expires_at"]) > datetime.now(UTC)
    assert tx.headers["cache-control"] == "no-store"
    assert token not in body["value"]
    obo = env.api.resolve("alice", "obo")
    assert obo.status_code == 200 and obo.json()["obtained_via"] == "entra_obo"
    listing = env.api.listing("alice")
    assert list(listing) == ["tx", "obo", "gh"]
    assert listing["tx"]["status"] == "connected" and listing["tx"]["mode"] == "token_exchange"
    assert listing["tx"]["obtained_via"] == "token_exchange" and listing["tx"]["expires_at"]
    assert listing["obo"]["status"] == "connected"
    assert listing["gh"] == {"server": "gh", "mode": "oauth_connect", "status": "not_connected", "expires_at": None,
                             "obtained_via": None, "scopes": [], "last_used_at": None}
    assert body["value"][7:] not in str(listing)

    grants = env.sandbox.provider.stats()["grants"].get("token_exchange", 0)
    assert env.api("DELETE", "/v1/users/alice/credentials/tx").status_code == 204
    assert env.api.listing("alice")["tx"]["status"] == "not_connected"
    again = env.api.resolve("alice", "tx")  # not served from the cache: minted anew
    assert again.status_code == 200 and again.json()["value"] != body["value"]
    assert env.sandbox.provider.stats()["grants"]["token_exchange"] == grants + 1
    assert env.api("DELETE", "/v1/users/nobody/credentials/tx").status_code == 204  # idempotent


def test_listing_statuses(env: Env) -> None:
    store = CredentialStore(make_engine(env.cluster.settings.database_url), env.cluster.settings.keyring)
    servers = servers_from_settings(env.cluster.settings)
    now = datetime.now(UTC)

    def put(server: str, expires: datetime, status: CredentialStatus) -> None:
        secret = register("cbtest-stored-" + secrets.token_hex(8))
        cred = Credential(Secret(secret), ObtainedVia.TOKEN_EXCHANGE, expires_at=expires, scopes=("read",))
        store.put("dan", servers[server].key, cred, status=status)

    put("tx", now - timedelta(minutes=1), CredentialStatus.CONNECTED)
    put("obo", now + timedelta(hours=1), CredentialStatus.DEGRADED)
    put("gh", now + timedelta(hours=1), CredentialStatus.NEEDS_RECONNECT)
    store.engine.dispose()
    listing = env.api.listing("dan")
    assert {k: v["status"] for k, v in listing.items()} == {"tx": "expired", "obo": "degraded",
                                                             "gh": "needs_reconnect"}
    assert listing["obo"]["scopes"] == ["read"]


def test_resolve_errors(env: Env) -> None:
    unknown = env.api.resolve("alice", "nope")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_server"
    assert env.api("POST", "/v1/connect", json={"user_id": "alice", "server": "nope"}).status_code == 404
    assert env.api("DELETE", "/v1/users/alice/credentials/nope").status_code == 404

    missing = env.api.resolve("nobody", "tx")
    assert missing.status_code == 409 and missing.json()["error"] == "subject_token_missing"

    never = env.api.resolve("nobody", "gh")
    assert never.status_code == 409
    body = never.json()
    assert body["error"] == "not_connected" and body["reason"] == "never_connected"
    assert body["connect_url"].startswith(env.url + "/v1/connect/open?state=")  # browser mode: the broker link

    env.sign_in("blocked-bob")
    denied = env.api.resolve("blocked-bob", "tx")
    assert denied.status_code == 403 and denied.json()["error"] == "policy_denied"
    assert "user_blocked" in denied.json()["message"]

    env.sign_in("erin")
    env.sandbox.provider.set_fault("token", "echo_secret", count=1)  # a 400 that quotes the secrets it got
    upstream = env.api.resolve("erin", "tx")
    assert upstream.status_code == 502
    assert upstream.json()["error"] == "upstream_error"
    assert upstream.json()["status"] == 400 and upstream.json()["oauth_error"] == "invalid_request"

    not_connect_mode = env.api("POST", "/v1/connect", json={"user_id": "alice", "server": "tx"})
    assert not_connect_mode.status_code == 422 and not_connect_mode.json()["message"].startswith("server:")


def test_timeout(env: Env) -> None:
    env.sign_in("slow")
    env.sandbox.provider.set_latency("token", 1500)
    try:
        r = env.api.resolve("slow", "tx", timeout=0.3)
        assert r.status_code == 504 and r.json()["error"] == "timeout"
    finally:
        env.sandbox.provider.set_latency("token", 0)
    # the flight itself goes on and lands; the next caller gets its result
    wait_for(lambda: env.api.resolve("slow", "tx").status_code == 200, 10, 0.2, what="the slow flight")


def test_store_disabled(env: Env, serve_variant: Any) -> None:
    api = serve_variant(env.variant(CREDBROKER_MASTER_KEYS="", CREDBROKER_TRANSPORT_KEY=""))
    calls = [
        api.resolve("alice", "tx"),
        api("PUT", "/v1/users/alice/subject-token", json={"token": "abc"}),
        api("GET", "/v1/users/alice/credentials"),
        api("POST", "/v1/connect", json={"user_id": "alice", "server": "gh"}),
        api("DELETE", "/v1/users/alice/credentials/tx"),
    ]
    for r in calls:
        assert r.status_code == 503 and r.json()["error"] == "store_disabled", r.text
        assert "CREDBROKER_MASTER_KEYS" in r.json()["message"]
    with Api(str(api.http.base_url), key=None) as browser:
        page = browser("GET", "/v1/connect/callback?state=x&code=y")
    assert page.status_code == 503 and "text/html" in page.headers["content-type"]


# -- the connect flow -----------------------------------------------------------------------


def _browser(url: str) -> httpx.Response:
    return httpx.get(url, follow_redirects=False, trust_env=False, timeout=20)


def test_connect_flow_through_the_api(env: Env, secret_guard: Any) -> None:
    started = env.api("POST", "/v1/connect", json={"user_id": "carol", "server": "gh"})
    assert started.status_code == 200
    assert set(started.json()) == {"connect_url", "expires_at"}
    assert datetime.fromisoformat(started.json()["expires_at"]) > datetime.now(UTC)
    connect_url = started.json()["connect_url"]
    assert connect_url.startswith(env.url + "/v1/connect/open?state=")
    with ConnectBrowser() as browser:
        opened = browser.get(connect_url)
        assert opened.status_code == 302 and opened.headers["location"].startswith(env.sandbox.url + "/authorize?")
        set_cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=lax" in set_cookie and "path=/v1/connect" in set_cookie
        location = browser.authorize(opened.headers["location"], user="carol")
        assert location.startswith(env.url + "/v1/connect/callback?")
        query = parse_qs(urlsplit(location).query)
        code, state = query["code"][0], query["state"][0]

        page = browser.get(location)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Confirm" in page.text and "<strong>gh</strong>" in page.text and "<code>c***l</code>" in page.text
        assert code not in page.text and form_of(page) == (env.url + "/v1/connect/confirm", state)
        assert env.api.listing("carol")["gh"]["status"] == "not_connected"  # nothing before the click
        assert _browser(location).status_code == 400  # the same callback from a browser without the cookie...
        done = browser.confirm(page)  # ...burned the link: a callback from elsewhere is refused
    assert done.status_code == 400 and "browser_mismatch" in done.text
    with ConnectBrowser() as browser:
        started = env.api("POST", "/v1/connect", json={"user_id": "carol", "server": "gh"})
        page = browser.consent(started.json()["connect_url"], user="carol")
        location = page.url
        code, state = parse_qs(location.query.decode())["code"][0], parse_qs(location.query.decode())["state"][0]
        done = browser.confirm(page)
    assert done.status_code == 200 and "Connected" in done.text and "<code>c***l</code>" in done.text
    assert "location" not in done.headers and done.headers["referrer-policy"] == "no-referrer"
    assert code not in done.text and state not in done.text
    assert done.headers["x-request-id"]
    replay = _browser(str(location))
    assert replay.status_code == 400 and "invalid_state" in replay.text and code not in replay.text
    ours = [line for line in secret_guard.lines if not line.startswith(("httpx ", "httpcore."))]
    assert not [line for line in ours if code in line or state in line]

    resolved = env.api.resolve("carol", "gh")
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["obtained_via"] == "connect_flow"
    listing = env.api.listing("carol")
    assert listing["gh"]["status"] == "connected" and listing["gh"]["obtained_via"] == "connect_flow"
    assert listing["tx"]["status"] == "not_connected"

    revocations = env.sandbox.provider.stats()["revocations"]
    assert env.api("DELETE", "/v1/users/carol/credentials/gh").status_code == 204
    assert env.sandbox.provider.stats()["revocations"] == revocations + 2  # refresh token, then access token
    revoked = {req["form"]["token_type_hint"]: req["form"]["token"] for req in env.sandbox.provider.requests("revoke")}
    assert revoked["access_token"] == resolved.json()["value"].removeprefix("Bearer ")
    register(revoked["refresh_token"])
    assert env.api.listing("carol")["gh"]["status"] == "not_connected"
    gone = env.api.resolve("carol", "gh")  # the cached copy went with it
    assert gone.status_code == 409 and gone.json()["error"] == "not_connected"
    metrics = env.api("GET", "/metrics").text
    assert 'credbroker_connect_steps_total{outcome="ok",step="confirm"}' in metrics
    assert 'credbroker_connect_callbacks_total{outcome="invalid_state"}' in metrics
    assert re.search(r'credbroker_provider_calls_total\{grant="authorization_code",result="success"\} [1-9]', metrics)  # cluster-wide


def test_callback_failures_are_pages(env: Env) -> None:
    with Api(env.url, key=None) as browser:
        _callback_failures(env, browser)


def _callback_failures(env: Env, browser: Api) -> None:
    missing = browser("GET", "/v1/connect/callback?code=abc")
    assert missing.status_code == 400 and "invalid_state" in missing.text
    assert missing.headers["content-type"].startswith("text/html") and "location" not in missing.headers
    started = env.api("POST", "/v1/connect", json={"user_id": "frank", "server": "gh"}).json()
    with ConnectBrowser() as user_browser:
        location = user_browser.authorize(user_browser.open(started["connect_url"]), consent="deny", user="frank")
        assert "error=access_denied" in location
        page = user_browser.get(location)
    assert page.status_code == 400 and "access_denied" in page.text and "declined" in page.text
    assert env.api.listing("frank")["gh"]["status"] == "not_connected"


# -- request ids and the audit trail ------------------------------------------------------------


def test_request_id_reaches_the_audit_trail(env: Env) -> None:
    rid = f"gw-{uuid.uuid4().hex[:12]}"
    env.sign_in("gina", headers={"X-Request-ID": rid})
    r = env.api("POST", "/v1/resolve", json={"user_id": "gina", "server": "tx"}, headers={"X-Request-ID": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    denied = env.api("POST", "/v1/resolve", json={"user_id": "gina", "server": "gh"}, headers={"X-Request-ID": rid})
    assert denied.status_code == 409 and denied.headers["x-request-id"] == rid
    generated = env.api("GET", "/v1/users/gina/credentials", headers={"X-Request-ID": "not a valid id"})
    assert generated.headers["x-request-id"] not in ("not a valid id", rid)

    sql = SqlAuditLog(make_engine(env.cluster.settings.database_url))

    def events() -> list[dict[str, Any]]:
        persist_audit_batch(env.cluster.redis, sql, "api-test")
        rows = env.api("GET", "/v1/audit", params={"user_id": "gina", "limit": "50"}).json()
        return [row for row in rows if row["request_id"] == rid]

    def enough() -> list[dict[str, Any]]:
        rows = events()
        return rows if len(rows) >= 3 else []

    rows = wait_for(enough, 15, 0.1, what="audit events with the request id")
    assert {(row["action"], row["outcome"]) for row in rows} >= {
        ("subject_token", "success"), ("acquire", "success"), ("connect", "failure")}
    assert all(row["user_id"] == "gina" for row in rows)
    one = env.api("GET", "/v1/audit", params={"user_id": "gina", "server": "tx", "limit": "1"}).json()
    assert len(one) == 1 and one[0]["server"] == "tx"
    future = int((datetime.now(UTC) + timedelta(hours=1)).timestamp())
    assert env.api("GET", "/v1/audit", params={"user_id": "gina", "since": str(future)}).json() == []
    sql.engine.dispose()
