"""The HTTP API against its own OpenAPI document, with schemathesis.

The document is the app's own (``workers.api.openapi``; a test checks that
``GET /openapi.json`` on the running API serves exactly it). Every operation in
it is driven by schemathesis (its coverage, unsupported-method and fuzzing
phases, valid and invalid data, derandomized) against uvicorn on loopback in
front of a real cluster (Redis, a Celery worker, the database, the sandbox
provider); boundary values the generators seldom reach are sent once each
through the same checks. Every response must:

* never be a 500, and be a 5xx only where the contract has one (502
  ``upstream_error``, 503 ``store_disabled``/``unavailable``, 504 ``timeout``),
  with the JSON error body (the browser callback answers with its page);
* have a status code the operation documents, the documented content type and
  a body that validates against the documented schema;
* carry ``X-Request-ID``, be accepted with the service key (no 401 on a
  secured route), and hold no registered test secret.

Some generated bodies and paths are pointed at configured servers and at
users with real credentials, so success responses (a resolved header, a
started connect flow, connected listings, audit events) are checked too, not
only the error shapes of random input.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.audit import SqlAuditLog
from broker.db import make_engine
from sandbox import SandboxHandle, SandboxProvider, run_sandbox
from sandbox.server import bind_socket, url_for
from tests.cluster import Cluster, redis_available
from tests.conftest import missing_service
from tests.integration.test_api import POLICY, Served
from tests.secrets import find_leaks, register
from workers.api.app import create_app
from workers.api.openapi import OPENAPI
from workers.common.auditstream import persist_audit_batch

pytestmark = pytest.mark.integration

KEY = register("cbtest-schemakey-" + secrets.token_hex(12))
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 100  # per operation (fuzzing phase, positive and negative); the file runs in ~20 s

# The contract's 5xx: status -> the error codes allowed with it.
CONTRACT_5XX = {502: {"upstream_error"}, 503: {"store_disabled", "unavailable"}, 504: {"timeout"}}
BROWSER_PATHS = {"/v1/connect/callback", "/v1/connect/open", "/v1/connect/confirm"}  # always a page
OPEN_PATHS = {"/healthz", "/readyz", "/openapi.json"} | BROWSER_PATHS
# Operations whose success needs a live state and code from a real consent (test_api covers them).
FLOW_ONLY = {"GET /v1/connect/callback", "GET /v1/connect/open", "POST /v1/connect/confirm",
             "POST /v1/connect/complete"}
ERASED = "erase-me"  # erasure and subject-token deletion aim here, so the seeded users stay
SERVERS = ("tx", "obo", "gh")
SIGNED_IN = "alice"  # has a subject token and tx/obo credentials
BLOCKED = "blocked-bob"  # has a subject token; the policy hook denies him
SEEN: dict[str, Counter[int]] = {}  # operation -> status codes of its generated requests


@dataclass
class Live:
    url: str
    session: requests.Session


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The API under uvicorn in front of a real cluster, shared by every operation's test."""
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    sandbox = run_sandbox(SandboxProvider())
    sock = bind_socket("127.0.0.1", 0)  # bound first: the callback URL must be known to the workers
    cluster = Cluster(tmp_path_factory.mktemp("api-schema"), sandbox.url, extra_env={
        "CREDBROKER_API_KEYS": KEY, "CREDBROKER_PUBLIC_URL": url_for(sock), "CREDBROKER_POLICY": POLICY,
        "CREDBROKER_RESOLVE_TIMEOUT": "5"})
    served = None
    session = requests.Session()
    session.trust_env = False  # loopback only: no proxy from the environment
    try:
        cluster.start_worker(concurrency=3)
        served = Served(create_app(cluster.settings), sock)
        _seed(served.url, sandbox, cluster)
        yield Live(served.url, session)
        for req in sandbox.provider.requests():
            for field in ("subject_token", "assertion", "refresh_token", "token"):
                value = req.get("form", {}).get(field)
                if isinstance(value, str):
                    register(value)
        leaks = find_leaks(cluster.all_logs())
        assert not leaks, f"{len(leaks)} test secret(s) leaked into the worker logs"
    finally:
        session.close()
        if served is not None:
            served.stop()
        cluster.stop()
        sandbox.stop()


def _seed(url: str, sandbox: SandboxHandle, cluster: Cluster) -> None:
    """Real state for the generated requests to find: tokens, credentials, audit events."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30, trust_env=False) as http:
        for user in (SIGNED_IN, BLOCKED):
            token = register(sandbox.provider.issue_subject_token(user, ttl=3600))
            expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            r = http.put(f"/v1/users/{user}/subject-token", json={"token": token, "expires_at": expires})
            assert r.status_code == 204, r.text
        for server in ("tx", "obo"):
            r = http.post("/v1/resolve", json={"user_id": SIGNED_IN, "server": server})
            assert r.status_code == 200, r.text
            register(r.json()["value"].removeprefix("Bearer "))
    sql = SqlAuditLog(make_engine(cluster.settings.database_url))
    persist_audit_batch(cluster.redis, sql, "api-schema-test")
    sql.engine.dispose()


def _served_document() -> dict[str, Any]:
    """The document under test: the app's own, exactly as ``GET /openapi.json`` serves it
    (JSON round trip; the test checks the live one is identical)."""
    return json.loads(json.dumps(OPENAPI))


schema = schemathesis.openapi.from_dict(_served_document(), config=schemathesis.Config())


def _mixed(generated: Any, variant: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The variant (drawn first, so it comes up often) or the generated value as it is."""
    return st.one_of(variant, st.just(generated))


def _with(base: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(fields).map(lambda extra: {**base, **extra})


_USERS = st.sampled_from((SIGNED_IN, BLOCKED, "nobody"))


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Aim generated bodies at configured servers and real users (the rest keeps its generated values)."""
    if not isinstance(body, dict) or not {"user_id", "server"} <= body.keys():
        return st.just(body)
    return _mixed(body, _with(body, {"user_id": _USERS, "server": st.sampled_from(SERVERS)}))


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext,
                            path_parameters: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Likewise for the user and server in a path."""
    if not isinstance(path_parameters, dict) or "user_id" not in path_parameters:
        return st.just(path_parameters)
    erasing = context.operation is not None and context.operation.method.lower() == "delete" and (
        context.operation.path in ("/v1/users/{user_id}", "/v1/users/{user_id}/subject-token"))
    known: dict[str, Any] = {"user_id": st.sampled_from((ERASED, "nobody")) if erasing else _USERS}
    if "server" in path_parameters:
        known["server"] = st.sampled_from(SERVERS)
    return _mixed(path_parameters, _with(path_parameters, known))


@schema.hook
def flatmap_query(context: schemathesis.HookContext, query: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Audit queries for real users, so listings of real events are checked too."""
    if context.operation is None or context.operation.path != "/v1/audit" or not isinstance(query, dict):
        return st.just(query)
    return _mixed(query, _with(query, {"user_id": _USERS}))


# HTTP framing belongs to the server, not the API: uvicorn answers a malformed
# Content-Length with a bare 400 before the application sees the request (no
# request id, no JSON), so a fuzzed value there tests h11, not this contract.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection", "expect", "te",
                              "upgrade", "trailer"})


@schema.hook
def map_headers(context: schemathesis.HookContext, headers: Any) -> Any:
    """Generated headers without the framing ones (see above)."""
    if not isinstance(headers, dict):
        return headers
    return {k: v for k, v in headers.items() if str(k).lower() not in _FRAMING_HEADERS}


def contract_server_errors(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                           case: schemathesis.Case) -> bool | None:
    """No 500 ever; a 5xx only where the contract has one, with its JSON error body."""
    status = response.status_code
    if status < 500:
        return None
    assert status in CONTRACT_5XX, f"{case.method} {case.path}: {status} is not a contract status"
    content_type = _header(response, "content-type")
    if case.path in BROWSER_PATHS:  # the browser's routes: always a page
        assert content_type.startswith("text/html"), content_type
        return None
    assert content_type.startswith("application/json"), content_type
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("message"), str), body
    assert body.get("error") in CONTRACT_5XX[status], f"{status} with error {body.get('error')!r}"
    return None


def response_basics(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                    case: schemathesis.Case) -> bool | None:
    """Every response has a request id, the key is accepted, and no test secret comes back."""
    assert _header(response, "x-request-id"), f"{case.method} {case.path}: no X-Request-ID"
    # Negative cases may drop the Authorization header on purpose (then 401 is right).
    sent_key = response.request.headers.get("Authorization") == AUTH["Authorization"]
    if sent_key and case.path not in OPEN_PATHS:
        assert response.status_code != 401, f"{case.method} {case.path}: the service key was refused"
    text = response.text
    if case.path == "/v1/resolve" and response.status_code == 200:
        text = json.dumps({k: v for k, v in response.json().items() if k != "value"})  # the one secret it serves
    leaks = find_leaks(text) + find_leaks(str(response.headers))
    assert not leaks, f"{len(leaks)} test secret(s) in the response to {case.method} {case.path}"
    return None


def _header(response: schemathesis.Response, name: str) -> str:
    values = next((v for k, v in response.headers.items() if k.lower() == name), [""])
    return str(values[0]) if values else ""


CHECKS = [contract_server_errors, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_basics]


def test_the_served_document_is_the_one_under_test(live: Live) -> None:
    served = live.session.get(f"{live.url}/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["content-type"].startswith("application/json")
    assert served.json() == _served_document()


def _call(case: schemathesis.Case, live: Live) -> schemathesis.Response:
    response = case.call_and_validate(base_url=live.url, session=live.session, headers=AUTH, checks=CHECKS,
                                      timeout=30)
    if case.operation.path == "/v1/resolve" and response.status_code == 200:
        register(response.json()["value"].removeprefix("Bearer "))  # minted here: logs must not show it
    return response


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_response_matches_the_openapi_document(case: schemathesis.Case, live: Live) -> None:
    response = _call(case, live)
    SEEN.setdefault(f"{case.operation.method.upper()} {case.operation.path}", Counter())[response.status_code] += 1


# The success answers the generated requests must have reached (so their schemas were checked).
EXPECTED_SUCCESSES = {
    "PUT /v1/users/{user_id}/subject-token": 204, "POST /v1/resolve": 200, "POST /v1/connect": 200,
    "GET /v1/users/{user_id}/credentials": 200, "DELETE /v1/users/{user_id}/credentials/{server}": 204,
    "DELETE /v1/users/{user_id}/subject-token": 204, "DELETE /v1/users/{user_id}": 204,
    "GET /v1/audit": 200, "POST /v1/warm": 202, "GET /v1/events": 200, "GET /healthz": 200, "GET /readyz": 200,
    "GET /metrics": 200, "GET /openapi.json": 200,
}


def test_the_generated_requests_reached_the_success_answers() -> None:
    if set(SEEN) != set(EXPECTED_SUCCESSES) | FLOW_ONLY:
        pytest.skip("needs every operation's generated run (not a -k selection)")
    missing = {op: dict(SEEN[op]) for op, status in EXPECTED_SUCCESSES.items() if not SEEN[op][status]}
    assert not missing, f"no success answer was checked for: {missing}"


# Boundary values the generators seldom or never reach, each sent once, through the same checks.
EDGE_INSTANTS: list[Any] = [
    "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", "0001-01-01T00:00:00", "9999-12-31T23:59:59Z",
    "2024-02-30T00:00:00Z", "2024-01-01T00:00:00+24:00", "", " ", "NaN", "Infinity", "1e400", "-1",
    253402300800, 253402300799, -1, 0, 1e308, 10**400, -10**400, True, None]
EDGE_TIMEOUTS: list[Any] = [5e-324, 1e-9, 1e308, 10**400, -10**400, 0, -1, True, "1", None]
EDGE_LIMITS = ["\u00b2", "\u0661\u0660", "0", "1", "1000", "1001", "-1", "", "1e3", "0100", "9" * 20]
# (not "." or "..": HTTP clients resolve those path segments before sending)
EDGE_USERS = ["\u00e9l\u00e8ve", "a" * 256, "a" * 257, " alice", "al\u2028ice", "al%ice", "tenant/alice"]


def _boundary_cases() -> list[Any]:
    token = "cbtest-edgetoken-0123456789abcdef"  # registered below: never to come back
    cases: list[Any] = []
    for value in EDGE_INSTANTS:
        cases.append(pytest.param("PUT", "/v1/users/{user_id}/subject-token",
                                  {"path_parameters": {"user_id": "edge-user"},
                                   "body": {"token": token, "expires_at": value}}, id=f"expires_at={value!r:.24}"))
        for field in ("since", "until"):
            cases.append(pytest.param("GET", "/v1/audit", {"query": {field: str(value)}},
                                      id=f"{field}={str(value)!r:.24}"))
    for value in EDGE_TIMEOUTS:
        for user in (SIGNED_IN, "nobody"):
            cases.append(pytest.param("POST", "/v1/resolve",
                                      {"body": {"user_id": user, "server": "tx", "timeout": value}},
                                      id=f"{user}-timeout={value!r:.24}"))
    for value in EDGE_LIMITS:
        cases.append(pytest.param("GET", "/v1/audit", {"query": {"limit": value}}, id=f"limit={value!r:.24}"))
    for user, server in (("nobody", "gh"), ("nobody", "tx"), (SIGNED_IN, "nope")):  # 409s and the 404
        cases.append(pytest.param("POST", "/v1/resolve", {"body": {"user_id": user, "server": server}},
                                  id=f"resolve-{user}-{server}"))
    for user in EDGE_USERS:
        cases.append(pytest.param("GET", "/v1/users/{user_id}/credentials", {"path_parameters": {"user_id": user}},
                                  id=f"user={user!r:.24}"))
        cases.append(pytest.param("POST", "/v1/connect", {"body": {"user_id": user, "server": "gh"}},
                                  id=f"connect-user={user!r:.24}"))
    register(token)
    return cases


@pytest.mark.parametrize("method, path, parts", _boundary_cases())
def test_boundary_values_get_a_documented_answer(live: Live, method: str, path: str, parts: dict[str, Any]) -> None:
    case = schema[path][method].Case(media_type="application/json" if "body" in parts else None, **parts)
    _call(case, live)
