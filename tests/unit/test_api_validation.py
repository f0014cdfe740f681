"""The HTTP API's input rules, auth and error mapping, without any service.

Requests go through the real app over httpx's ASGI transport; paths that
would reach Redis or the database are stubbed or never reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from broker.errors import (
    InvalidRequest,
    NoCredential,
    NotConnected,
    PolicyDenied,
    ResolveTimeout,
    StoreDisabled,
    SubjectTokenMissing,
    UnknownServer,
    UpstreamError,
)
from broker.secret import Secret
from broker.settings import load_settings
from broker.validation import validate_server_name, validate_user_id
from tests.secrets import assert_no_leak, canary
from workers.api import create_app
from workers.api_input import (
    MAX_BODY_BYTES,
    bearer_matches,
    check_fields,
    parse_instant,
    parse_json_object,
    parse_limit,
    parse_timeout,
    parse_token,
)
from workers.api_openapi import OPENAPI

KEY = "unit-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


# -- pure rules ------------------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    (b"", "JSON object is required"),
    (b"{bad", "malformed JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": 1, "a": 2}', "a field appears twice"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": ' + b"[" * 9 + b"]" * 9 + b"}", "nested deeper"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "larger than"),
    (b'{"a": "' + b"x" * MAX_BODY_BYTES + b'"}', "larger than"),
])
def test_bodies_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_json_object(raw)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    body = parse_json_object(b'{"token": "[[[[[[[[[[[[{{{{{{{{\\"]]]"}')
    assert body["token"].startswith("[[[")


def test_malformed_json_message_does_not_quote_the_body() -> None:
    secret = canary("body")
    with pytest.raises(InvalidRequest) as info:
        parse_json_object(f'{{"token": "{secret}" oops}}'.encode())
    assert_no_leak(info.value.message)


def test_fields_unknown_and_missing() -> None:
    with pytest.raises(InvalidRequest, match="unknown field.*1 not recognised; allowed: server, user_id") as info:
        check_fields({"usr": "a", "server": "x"}, ("user_id", "server"))
    assert "usr" not in info.value.message  # a submitted name is never echoed
    with pytest.raises(InvalidRequest, match="^user_id: required"):
        check_fields({"server": "x"}, ("user_id", "server"))
    check_fields({"user_id": "a", "server": "x", "timeout": 2}, ("user_id", "server"), ("timeout",))


@pytest.mark.parametrize("value, expected", [
    ("2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2030-01-02T04:04:05+01:00", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2030-01-02T03:04:05", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
    (1893553445, datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
    (1893553445.5, datetime(2030, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
    ("1893553445", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
])
def test_instants(value: object, expected: datetime) -> None:
    assert parse_instant(value, "expires_at") == expected


@pytest.mark.parametrize("value", ["tomorrow", "", True, None, [], -1, 1e20, float("nan"), "inf"])
def test_bad_instants_name_the_field(value: object) -> None:
    with pytest.raises(InvalidRequest, match="^expires_at: "):
        parse_instant(value, "expires_at")


def test_timeout_is_positive_and_capped() -> None:
    assert parse_timeout(2, 30) == 2.0
    assert parse_timeout(300, 30) == 30
    for bad in (0, -1, "5", True, None, float("inf")):
        with pytest.raises(InvalidRequest, match="^timeout: "):
            parse_timeout(bad, 30)


def test_limit() -> None:
    assert parse_limit(None) == 100
    assert parse_limit("7") == 7
    for bad in ("0", "-1", "1001", "x", "1e3", "99999999999"):
        with pytest.raises(InvalidRequest, match="^limit: "):
            parse_limit(bad)


def test_token_rules_never_echo_the_value() -> None:
    assert parse_token("eyJ.abc.def").reveal() == "eyJ.abc.def"
    for bad in ("", 5, None, "has space", "tab\tin", "x" * 40_000):
        with pytest.raises(InvalidRequest, match="^token: ") as info:
            parse_token(bad)
        if isinstance(bad, str) and bad:
            assert bad not in info.value.message


def test_bearer_matching() -> None:
    keys = (Secret("first-key-0123456789"), Secret("second-key-0123456789"))
    assert bearer_matches("Bearer second-key-0123456789", keys)
    assert bearer_matches("bearer first-key-0123456789", keys)
    for bad in (None, "", "Bearer", "Bearer ", "Basic first-key-0123456789", "Bearer first-key-012345678",
                "Bearer first-key-0123456789x", "first-key-0123456789"):
        assert not bearer_matches(bad, keys)
    assert not bearer_matches("Bearer anything-at-all-000", ())


# -- through the app ----------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Starlette]:
    settings = load_settings({
        "CREDBROKER_API_KEYS": f"{KEY},other-key-0123456789abc",
        "CREDBROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}",
        "CREDBROKER_MASTER_KEYS": "k1:" + "A" * 43 + "=",
        "CREDBROKER_SERVERS_FILE": str(_servers(tmp_path)),
        "CREDBROKER_REDIS_URL": "redis://127.0.0.1:1/0",  # never reached by these tests
    }, env_file=None)
    application = create_app(settings)
    yield application
    application.state.api.close()


def _servers(tmp_path: Path) -> Path:
    path = tmp_path / "servers.json"
    ab = {"token_endpoint": "https://idp.test/token", "client_id": "c"}
    path.write_text(json.dumps({"servers": [
        {"name": "tx", "url": "https://tx.test/mcp", "auth_broker": {"mode": "token_exchange", **ab}},
        {"name": "gh", "url": "https://gh.test/mcp",
         "auth_broker": {"mode": "oauth_connect", **ab, "authorization_endpoint": "https://idp.test/authorize"}},
    ]}))
    return path


def call(app: Starlette, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            return await client.request(method, path, **kwargs)

    return anyio.run(go)


def test_auth_on_every_v1_route_and_metrics(app: Starlette) -> None:
    for method, path in [("POST", "/v1/resolve"), ("POST", "/v1/connect"), ("GET", "/v1/audit"),
                         ("PUT", "/v1/users/a/subject-token"), ("GET", "/v1/users/a/credentials"),
                         ("DELETE", "/v1/users/a/credentials/tx"), ("GET", "/metrics"), ("GET", "/v1/nope")]:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789abc"}, {"Authorization": f"Basic {KEY}"}):
            r = call(app, method, path, headers=headers)
            assert r.status_code == 401, (method, path)
            assert r.json()["error"] == "unauthorized"
            # Says where a key comes from, and where the demo keeps its key.
            assert "CREDBROKER_API_KEYS" in r.json()["message"] and "demo-api-key" in r.json()["message"]
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.headers["x-request-id"]
    assert call(app, "GET", "/metrics", headers={"Authorization": "Bearer other-key-0123456789abc"}).status_code == 200
    assert call(app, "GET", "/healthz").json() == {"status": "ok"}
    assert call(app, "GET", "/openapi.json").json()["openapi"] == "3.1.0"


def test_no_keys_refuses_v1(tmp_path: Path, secret_guard: Any) -> None:
    settings = load_settings({"CREDBROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}",
                              "CREDBROKER_SERVERS_FILE": str(_servers(tmp_path))}, env_file=None)
    app = create_app(settings)
    try:
        assert any("CREDBROKER_API_KEYS is not set" in line for line in secret_guard.lines)
        r = call(app, "POST", "/v1/resolve", json={"user_id": "a", "server": "tx"},
                 headers={"Authorization": "Bearer "})
        assert r.status_code == 401 and "no API keys configured" in r.json()["message"]
        assert "set CREDBROKER_API_KEYS" in r.json()["message"]
        assert call(app, "GET", "/healthz").status_code == 200
    finally:
        app.state.api.close()


@pytest.mark.parametrize("body, field", [
    (b"{bad", "body"),
    (b"[]", "body"),
    (json.dumps({"user_id": 5, "server": "tx"}).encode(), "user_id"),
    (json.dumps({"user_id": "a" * 257, "server": "tx"}).encode(), "user_id"),
    (json.dumps({"user_id": "a/b", "server": "tx"}).encode(), "user_id"),
    (json.dumps({"user_id": "a\x07b", "server": "tx"}).encode(), "user_id"),
    (json.dumps({"user_id": "", "server": "tx"}).encode(), "user_id"),
    (json.dumps({"user_id": "a", "server": ["tx"]}).encode(), "server"),
    (json.dumps({"user_id": "a", "server": "t/x"}).encode(), "server"),
    (json.dumps({"user_id": "a", "server": "tx", "timeout": "soon"}).encode(), "timeout"),
    (json.dumps({"user_id": "a", "server": "tx", "timeout": -1}).encode(), "timeout"),
    (json.dumps({"user_id": "a", "server": "tx", "extra": 1}).encode(), "body"),
    (json.dumps({"server": "tx"}).encode(), "user_id"),
])
def test_resolve_input_errors_name_the_field(app: Starlette, body: bytes, field: str) -> None:
    r = call(app, "POST", "/v1/resolve", content=body, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"
    assert r.json()["message"].startswith(field + ":")


def test_path_user_ids(app: Starlette) -> None:
    for path in ("/v1/users/a%2Fb/credentials", "/v1/users/" + "u" * 257 + "/credentials",
                 "/v1/users/%07x/credentials", "/v1/users//credentials"):
        r = call(app, "GET", path, headers=AUTH)
        assert r.status_code == 422 and r.json()["message"].startswith("user_id:"), path
    # A newline or an encoded slash in the id reaches the validator on every user route (422, not 404).
    for method, path in (("GET", "/v1/users/%0A/credentials"), ("DELETE", "/v1/users/%0A/subject-token"),
                         ("PUT", "/v1/users/%0A/subject-token"), ("DELETE", "/v1/users/%0A"),
                         ("DELETE", "/v1/users/a%2Fb"), ("DELETE", "/v1/users/%0A/credentials/tx")):
        r = call(app, method, path, headers=AUTH, **({"json": {"token": "t"}} if method == "PUT" else {}))
        assert r.status_code == 422 and r.json()["message"].startswith("user_id:"), (method, path)


def test_oversized_bodies_with_and_without_length(app: Starlette) -> None:
    big = b'{"token": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    r = call(app, "PUT", "/v1/users/alice/subject-token", content=big, headers=AUTH)
    assert r.status_code == 422 and "larger than" in r.json()["message"]

    async def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 8192

    r = call(app, "PUT", "/v1/users/alice/subject-token", content=chunks(), headers=AUTH)
    assert r.status_code == 422 and "larger than" in r.json()["message"]


def test_subject_token_body_rules(app: Starlette) -> None:
    for body, field in [({"token": "t", "expires_at": "later"}, "expires_at"), ({"expires_at": 5}, "token"),
                        ({"token": 5}, "token"), ({"token": "t", "scope": "x"}, "body")]:
        r = call(app, "PUT", "/v1/users/alice/subject-token", json=body, headers=AUTH)
        assert r.status_code == 422 and r.json()["message"].startswith(field + ":"), body


def test_audit_query_rules(app: Starlette) -> None:
    for query, field in [("limit=0", "limit"), ("limit=1001", "limit"), ("since=yesterday", "since"), ("user=a", "query"),
                         ("user_id=a%2Fb", "user_id")]:
        r = call(app, "GET", "/v1/audit?" + query, headers=AUTH)
        assert r.status_code == 422 and r.json()["message"].startswith(field + ":"), query


@pytest.mark.parametrize("error, status, extra", [
    (UpstreamError(status=400, oauth_error="invalid_grant"), 502, {"status": 400, "oauth_error": "invalid_grant"}),
    (NotConnected(reason="reconnect_required", connect_url="https://idp.test/authorize?x=1"), 409,
     {"reason": "reconnect_required", "connect_url": "https://idp.test/authorize?x=1"}),
    (PolicyDenied("denied by policy: nope"), 403, {}),
    (NoCredential(), 409, {}),
    (SubjectTokenMissing(), 409, {}),
    (UnknownServer("unknown server 'x'"), 404, {}),
    (StoreDisabled(), 503, {}),
    (ResolveTimeout(), 504, {}),
])
def test_broker_errors_map_to_contract(app: Starlette, monkeypatch: pytest.MonkeyPatch, error: Exception,
                                       status: int, extra: dict[str, Any]) -> None:
    seen: dict[str, Any] = {}

    def fake_resolve(user_id: str, server: str, timeout: float | None = None, request_id: str | None = None) -> Any:
        seen.update(timeout=timeout, request_id=request_id)
        raise error

    monkeypatch.setattr(app.state.api.client, "resolve", fake_resolve)
    r = call(app, "POST", "/v1/resolve", json={"user_id": "a", "server": "tx", "timeout": 999},
             headers={**AUTH, "X-Request-ID": "gw-123"})
    assert r.status_code == status
    body = r.json()
    assert body["error"] == error.code and isinstance(body["message"], str)  # type: ignore[attr-defined]
    assert {k: body[k] for k in extra} == extra
    assert r.headers["x-request-id"] == "gw-123"
    assert seen == {"timeout": 30.0, "request_id": "gw-123"}


def test_unexpected_errors_are_500_without_detail(app: Starlette, monkeypatch: pytest.MonkeyPatch,
                                                  secret_guard: Any) -> None:
    secret = canary("crash")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"driver said {secret}")

    monkeypatch.setattr(app.state.api.rt.store, "put_subject_token", boom)
    r = call(app, "PUT", "/v1/users/alice/subject-token", json={"token": "t"}, headers=AUTH)
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "internal error"}
    assert_no_leak(r.text)
    assert any("unhandled RuntimeError" in line for line in secret_guard.lines)


def test_invalid_request_id_is_replaced(app: Starlette) -> None:
    r = call(app, "GET", "/healthz", headers={"X-Request-ID": "has spaces in it"})
    assert r.headers["x-request-id"] != "has spaces in it" and len(r.headers["x-request-id"]) == 32


def test_openapi_names_every_route(app: Starlette) -> None:
    served = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((route.path.replace(":path", "").replace(":userid", ""), method.lower()))
    documented = {(path, method) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert served == documented
    for path, ops in OPENAPI["paths"].items():
        for op in ops.values():
            assert "responses" in op, path
    assert "Error" in OPENAPI["components"]["schemas"]


@pytest.mark.parametrize("raw", [
    '{"user_id": "a", "server": "x"}'.encode("utf-16"),       # UTF-16 with a BOM
    '{"user_id": "a", "server": "x"}'.encode("utf-32"),
    b"\xef\xbb\xbf" + b'{"user_id": "a", "server": "x"}',     # UTF-8 BOM
    '{"user_id": "zo\u00eb", "server": "x"}'.encode("latin-1"),  # Latin-1 bytes
    b'{"user_id": "\xc0\xaf", "server": "x"}',                  # overlong UTF-8 "/"
    b'{"user_id": "a\xed\xa0\x80", "server": "x"}',             # encoded surrogate
])
def test_odd_encodings_are_refused_or_parsed_strictly(raw: bytes) -> None:
    """Anything that is not plain UTF-8 JSON is a clear 422, never a crash; a
    body that parses still goes through the user-id rules."""
    try:
        body = parse_json_object(raw)
    except InvalidRequest as exc:
        assert exc.code == "invalid_request"
        return
    from broker.validation import validate_user_id

    validate_user_id(body["user_id"])


@pytest.mark.parametrize("user_id", ["a\\u0000b", "\\ud800", "a\\r\\nX-Evil: 1", "\\u202e", "a/b", " a"])
def test_escaped_control_and_surrogate_user_ids(user_id: str) -> None:
    from broker.validation import validate_user_id

    body = parse_json_object(('{"user_id": "' + user_id + '", "server": "x"}').encode())
    with pytest.raises(InvalidRequest, match="^user_id"):
        validate_user_id(body["user_id"])


def test_no_error_message_echoes_a_submitted_value() -> None:
    """Issue 12: names and values a caller sends never come back in a message."""
    from broker.errors import UnknownServer
    from broker.servers import ServerRegistry

    marker = "<script>cbtest-echo</script>"
    messages = []
    for call in (lambda: ServerRegistry([]).get_server(marker),
                 lambda: check_fields({marker: 1, "server": "x"}, ("user_id", "server")),
                 lambda: parse_json_object(('{"' + marker + '": 1, "' + marker + '": 2}').encode()),
                 lambda: validate_user_id(marker + "/x"),
                 lambda: validate_server_name(marker + "/x")):
        with pytest.raises((InvalidRequest, UnknownServer)) as info:
            call()
        messages.append(str(info.value.to_dict()))
    assert not [m for m in messages if "cbtest-echo" in m or "script" in m], messages
