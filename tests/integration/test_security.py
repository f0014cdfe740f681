"""Issue 12 over real HTTP in front of a real cluster: each finding, tried as an attacker would.

Completion bound to its user (gateway and browser modes), key separation
(a state forged with the transport key), abuse limits (junk callbacks, live
states per pair, /readyz), erasure (nothing of the user left in the database
or Redis, the provider saw the revoke). The rolling master-key rotation is in
test_key_rotation.py (its own cluster: two clusters on one Redis db would
share a queue).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import text

from broker.audit import SqlAuditLog
from broker.db import make_engine
from broker.oauth.pkce import new_state, new_verifier
from sandbox import SandboxProvider, run_sandbox
from sandbox.server import bind_socket, url_for
from broker.servers import servers_from_settings
from broker.settings import Settings, load_settings
from broker.state import STATE_GROUP_PREFIX, STATE_PREFIX, state_key
from tests.cluster import Cluster, read_all_redis, redis_available, wait_for
from tests.conftest import missing_service
from tests.integration.connect_browser import ConnectBrowser
from tests.integration.test_api import KEY, Api, Served
from tests.integration.test_api import Env as ApiEnv
from tests.secrets import register
from workers.api.app import create_app
from workers.common.auditstream import persist_audit_batch
from workers.common.constants import AUDIT_STREAM

pytestmark = pytest.mark.integration

GATEWAY_CALLBACK = "https://gateway.example.test/connect/done"


class Env(ApiEnv):
    """test_api's environment, plus settings variants and the audit table."""

    def variant(self, **env: str) -> Settings:
        return load_settings({**self.cluster.env, **env}, env_file=None)

    def persist_audit(self) -> None:
        sql = SqlAuditLog(make_engine(self.cluster.settings.database_url))
        try:
            wait_for(lambda: persist_audit_batch(self.cluster.redis, sql, "security-test") == 0
                     and self.cluster.redis.xlen(AUDIT_STREAM) == 0, 10, 0.1, what="the audit stream to drain")
        finally:
            sql.engine.dispose()

    def audit_rows(self) -> int:
        engine = make_engine(self.cluster.settings.database_url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one())
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    sandbox = run_sandbox(SandboxProvider())
    sock = bind_socket("127.0.0.1", 0)
    cluster = Cluster(tmp_path_factory.mktemp("security"), sandbox.url, extra_env={
        "CREDBROKER_API_KEYS": KEY, "CREDBROKER_PUBLIC_URL": url_for(sock)})
    served = None
    try:
        cluster.start_worker(concurrency=2)
        served = Served(create_app(cluster.settings), sock)
        api = Api(served.url)
        yield Env(cluster, sandbox, served, api)
        api.close()
    finally:
        if served is not None:
            served.stop()
        cluster.stop()
        sandbox.stop()


@pytest.fixture
def serve(env: Env) -> Iterator[Any]:
    started: list[tuple[Served, Api]] = []

    def start(settings: Settings) -> Api:
        served = Served(create_app(settings))
        started.append((served, Api(served.url)))
        return started[-1][1]

    yield start
    for served, api in started:
        api.close()
        served.stop()


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _gh_key(env: Env) -> str:
    return servers_from_settings(env.cluster.settings)["gh"].key


# -- 1. completion bound to its user -------------------------------------------------------------


def test_gateway_mode_refuses_a_foreign_users_completion(env: Env, serve: Any) -> None:
    gateway = serve(env.variant(CREDBROKER_CONNECT_CALLBACK_URL=GATEWAY_CALLBACK))
    started = gateway("POST", "/v1/connect", json={"user_id": "gw-alice", "server": "gh"}).json()
    params = _query(started["connect_url"])
    assert started["connect_url"].startswith(env.sandbox.url + "/authorize?")
    assert params["redirect_uri"] == GATEWAY_CALLBACK
    with ConnectBrowser() as bob:  # Alice had Bob open her link; Bob consents
        back = _query(bob.authorize(started["connect_url"], user="gw-bob-upstream"))
    grants = len(env.sandbox.provider.requests("token"))

    refused = gateway("POST", "/v1/connect/complete",
                      json={"state": back["state"], "code": back["code"], "user_id": "gw-bob"})

    assert refused.status_code == 403 and refused.json()["error"] == "connect_user_mismatch"
    assert "gw-bob" not in refused.text and back["code"] not in refused.text
    burned = gateway("POST", "/v1/connect/complete",
                     json={"state": back["state"], "code": back["code"], "user_id": "gw-alice"})
    assert burned.status_code == 400 and burned.json()["error"] == "invalid_state"
    assert len(env.sandbox.provider.requests("token")) == grants  # the code was never redeemed
    for user in ("gw-alice", "gw-bob"):
        assert gateway.listing(user)["gh"]["status"] == "not_connected"
    # The gateway's own user completes; a refused code answers 502.
    started = gateway("POST", "/v1/connect", json={"user_id": "gw-alice", "server": "gh"}).json()
    with ConnectBrowser() as alice:
        back = _query(alice.authorize(started["connect_url"], user="gw-alice-upstream"))
    done = gateway("POST", "/v1/connect/complete",
                   json={"state": back["state"], "code": back["code"], "user_id": "gw-alice"})
    assert done.status_code == 200 and done.json() == {"server": "gh", "status": "connected"}
    assert gateway.resolve("gw-alice", "gh").json()["obtained_via"] == "connect_flow"
    started = gateway("POST", "/v1/connect", json={"user_id": "gw-carol", "server": "gh"}).json()
    bad = gateway("POST", "/v1/connect/complete",
                  json={"state": _query(started["connect_url"])["state"], "code": "sbx_ac_forged", "user_id": "gw-carol"})
    assert bad.status_code == 502 and bad.json()["error"] == "upstream_error"
    with Api(str(gateway.http.base_url), key=None) as browser:  # the broker's callback completes nothing here
        page = browser("GET", f"/v1/connect/callback?state={back['state']}&code=x")
    assert page.status_code == 400 and "gateway_mode" in page.text


def test_browser_mode_refuses_a_foreign_browser_and_sets_a_tight_cookie(env: Env, serve: Any) -> None:
    started = env.api("POST", "/v1/connect", json={"user_id": "br-alice", "server": "gh"}).json()
    with ConnectBrowser() as alice, ConnectBrowser() as bob:
        authorize_url = alice.open(started["connect_url"])  # Alice's browser holds the cookie
        assert alice.get(started["connect_url"]).status_code == 400  # a link binds one browser only
        callback = bob.authorize(authorize_url, user="br-bob-upstream")  # she forwards the provider's URL
        page = bob.get(callback)
        assert page.status_code == 400 and "browser_mismatch" in page.text
        assert alice.get(callback).status_code == 400  # burned, even for the right browser
    assert env.api.listing("br-alice")["gh"]["status"] == "not_connected"
    assert env.api.listing("br-bob")["gh"]["status"] == "not_connected"
    # With an https PUBLIC_URL the cookie is __Host- prefixed and Secure.
    https = serve(env.variant(CREDBROKER_PUBLIC_URL="https://broker.example.test"))
    started = https("POST", "/v1/connect", json={"user_id": "br-alice", "server": "gh"}).json()
    assert started["connect_url"].startswith("https://broker.example.test/v1/connect/open?state=")
    with Api(str(https.http.base_url), key=None) as browser:
        opened = browser("GET", "/v1/connect/open?" + urlsplit(started["connect_url"]).query)
    cookie = opened.headers["set-cookie"]
    assert opened.status_code == 302 and cookie.startswith("__Host-cbconnect-")
    assert {"httponly", "secure", "samesite=lax", "path=/"} <= {p.strip().lower() for p in cookie.split(";")}


# -- 2. key separation ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["explicit", "derived"])
def test_a_state_forged_with_the_transport_key_is_refused(env: Env, serve: Any, transport: str) -> None:
    settings = env.variant(CREDBROKER_CONNECT_CALLBACK_URL=GATEWAY_CALLBACK,
                           **({} if transport == "explicit" else {"CREDBROKER_TRANSPORT_KEY": ""}))
    gateway = serve(settings)
    sealer = settings.sealer()  # what a gateway holds
    assert sealer is not None
    forged = new_state()
    key = state_key(forged)
    env.cluster.redis.set(key, sealer.seal_json({"u": "victim", "s": "gh", "k": _gh_key(env), "v": new_verifier(),
                                                 "exp": 4102444800.0}, key), ex=600)
    grants = len(env.sandbox.provider.requests("token"))

    r = gateway("POST", "/v1/connect/complete", json={"state": forged, "code": "sbx_ac_attacker", "user_id": "victim"})

    assert r.status_code == 400 and r.json()["error"] == "invalid_state"
    assert len(env.sandbox.provider.requests("token")) == grants
    assert gateway.listing("victim")["gh"]["status"] == "not_connected"


# -- 3. abuse limits -----------------------------------------------------------------------------


def test_junk_callbacks_add_no_audit_rows_and_ignore_the_callers_request_id(env: Env) -> None:
    env.persist_audit()
    before = env.audit_rows()
    n = int(os.environ.get("CREDBROKER_TEST_JUNK_CALLBACKS", "1000"))
    with httpx.Client(base_url=env.url, trust_env=False, timeout=30) as browser:
        for i in range(n):
            r = browser.get(f"/v1/connect/callback?state=junk{i}&code=x", headers={"X-Request-ID": f"evil-{i}"})
            assert r.status_code == 400 and r.headers["x-request-id"] != f"evil-{i}"
        confirm = browser.post("/v1/connect/confirm", data={"state": "junk"}, headers={"X-Request-ID": "evil-c"})
        assert confirm.status_code == 400 and confirm.headers["x-request-id"] != "evil-c"
    env.persist_audit()
    assert env.audit_rows() == before
    metrics = env.api("GET", "/metrics").text
    line = next(m for m in metrics.splitlines() if m.startswith('credbroker_connect_callbacks_total{outcome="invalid_state"}'))
    assert float(line.split()[-1]) >= n
    assert env.api("GET", "/v1/users/alice/credentials", headers={"X-Request-ID": "gw-1"}).headers[
        "x-request-id"] == "gw-1"  # an authenticated caller keeps its id


def test_live_connect_states_are_capped_per_pair(env: Env) -> None:
    n = int(os.environ.get("CREDBROKER_TEST_CONNECT_POSTS", "1000"))
    cap = env.cluster.settings.connect_states_per_pair
    urls = [env.api("POST", "/v1/connect", json={"user_id": "cap-user", "server": "gh"}).json()["connect_url"]
            for _ in range(n)]

    assert len(set(urls)) == n  # a fresh state (and verifier) per call
    states = [_query(u)["state"] for u in urls]
    live = [s for s in states if env.cluster.redis.exists(state_key(s))]
    assert live == states[-cap:]  # the newest survive, the oldest were evicted
    all_states = [k for k in env.cluster.redis.scan_iter(match=STATE_PREFIX + "*", count=1000)
                  if not k.decode().endswith((":b", ":c"))]
    assert len(all_states) <= cap + 1  # + any other test's pending link in this module
    with ConnectBrowser() as browser:
        assert browser.get(urls[0]).status_code == 400  # evicted
        assert browser.get(urls[-1]).status_code == 302  # still good


def test_readyz_is_cached(env: Env) -> None:
    def probes() -> float:
        text = env.api("GET", "/metrics").text
        return sum(float(m.split()[-1]) for m in text.splitlines() if m.startswith("credbroker_readyz_probes_total"))

    from workers.api.app import READY_CACHE_SECONDS

    with Api(env.url, key=None) as anyone:
        anyone("GET", "/readyz")  # fills the cache
        before, started = probes(), time.monotonic()
        for _ in range(30):
            assert anyone("GET", "/readyz").status_code == 200
        elapsed = time.monotonic() - started
    # Uncached, that would be 30 probe rounds (each pinging every worker); cached, one per window.
    assert probes() - before <= 1 + int(elapsed / READY_CACHE_SECONDS)
    assert elapsed < 10 * READY_CACHE_SECONDS  # so the bound above is well under 30


# -- 5. erasure ----------------------------------------------------------------------------------


def test_erasure_leaves_nothing_of_the_user(env: Env) -> None:
    user = "erin-" + os.urandom(4).hex()
    token = register(env.sandbox.provider.issue_subject_token(user, ttl=3600))
    assert env.api("PUT", f"/v1/users/{user}/subject-token", json={"token": token}).status_code == 204
    tx = env.api.resolve(user, "tx")
    assert tx.status_code == 200
    register(tx.json()["value"].removeprefix("Bearer "))
    started = env.api("POST", "/v1/connect", json={"user_id": user, "server": "gh"}).json()
    with ConnectBrowser() as browser:
        page = browser.consent(started["connect_url"], user=user + "-upstream")
        assert browser.confirm(page).status_code == 200
    gh = env.api.resolve(user, "gh")
    assert gh.status_code == 200 and gh.json()["obtained_via"] == "connect_flow"
    register(gh.json()["value"].removeprefix("Bearer "))
    env.api("POST", "/v1/connect", json={"user_id": user, "server": "gh"})  # a pending link
    revocations = env.sandbox.provider.stats()["revocations"]

    assert env.api("DELETE", f"/v1/users/{user}").status_code == 204

    assert env.sandbox.provider.stats()["revocations"] == revocations + 2  # refresh and access token of gh
    assert env.api("DELETE", f"/v1/users/{user}").status_code == 204  # idempotent
    assert env.api("DELETE", f"/v1/users/{user}/subject-token").status_code == 204  # none stored: still 204
    gone = env.api.resolve(user, "tx")
    assert gone.status_code == 409 and gone.json()["error"] == "subject_token_missing"
    env.api("DELETE", f"/v1/users/{user}")  # that resolve's own traces
    env.persist_audit()
    engine = make_engine(env.cluster.settings.database_url)
    try:
        with engine.connect() as conn:
            dump = "\n".join(repr(tuple(row)) for table in ("credentials", "subject_tokens", "audit_events",
                                                                           "connection_events")
                             for row in conn.execute(text(f"SELECT * FROM {table}")))
            erased = conn.execute(text("SELECT user_id FROM audit_events WHERE action = 'erase'")).scalars().all()
    finally:
        engine.dispose()
    assert user not in dump
    assert erased and all(e.startswith("erased:") for e in erased)
    redis_dump = read_all_redis(env.cluster.redis)
    assert user not in redis_dump
    from workers.common.constants import cache_key

    key = _gh_key(env)
    assert not env.cluster.redis.exists(cache_key(user, key))
    from broker.connect import pair_group

    assert not env.cluster.redis.exists(STATE_GROUP_PREFIX + pair_group(user, key))


def test_erasure_drops_buffered_use_marks_of_the_user(redis_url: str) -> None:
    """A use mark still buffered in this process when the user is erased must
    not be flushed back into Redis afterwards (it names the user)."""
    import json
    import uuid

    import redis

    from workers.common.auditstream import StreamAuditSink
    from workers.common.constants import USED_ZSET

    client = redis.Redis.from_url(redis_url)
    gone, kept = f"erased-{uuid.uuid4().hex}", f"kept-{uuid.uuid4().hex}"
    sink = StreamAuditSink(client)
    try:
        sink.mark_used(gone, "k1")
        sink.mark_used(gone, "k2")
        sink.mark_used(kept, "k1")
        sink.discard_used(gone)
        sink.flush()
        members = {json.loads(m)[0] for m in client.zrange(USED_ZSET, 0, -1)}
        assert kept in members and gone not in members
    finally:
        sink.close()
        client.zrem(USED_ZSET, json.dumps([kept, "k1"]))
        client.close()
