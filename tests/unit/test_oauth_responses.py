"""Token and error response parsing: every rule, and no server string leaking."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.errors import UpstreamError
from broker.models import ObtainedVia
from broker.oauth.responses import (
    MAX_EXPIRES_IN,
    RETRY_AFTER_CAP,
    jwt_expiry,
    parse_error_response,
    parse_retry_after,
    parse_token_response,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
FAKE_SECRET = "sk-live-THIS-MUST-NOT-LEAK"


def parse(body: Any, status: int = 200, headers: dict[str, str] | None = None, **kw: Any):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    kw.setdefault("obtained_via", ObtainedVia.TOKEN_EXCHANGE)
    kw.setdefault("requested_scopes", ("read",))
    return parse_token_response(status, headers or {}, raw, now=NOW, **kw)


def jwt(payload: dict[str, Any]) -> str:
    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'RS256', 'typ': 'JWT'})}.{seg(payload)}.c2lnbmF0dXJl"


def test_minimal_response_defaults() -> None:
    cred = parse({"access_token": "at-1"}, audience="api")
    assert cred.access_token.reveal() == "at-1"
    assert cred.token_type == "Bearer"
    assert cred.expires_at is None  # opaque token, no expires_in
    assert cred.issued_at == NOW
    assert cred.refresh_token is None
    assert cred.scopes == ("read",)
    assert cred.audience == "api"
    assert cred.obtained_via is ObtainedVia.TOKEN_EXCHANGE


@pytest.mark.parametrize("given", ["bearer", "BEARER", "Bearer"])
def test_bearer_case_is_normalized(given: str) -> None:
    assert parse({"access_token": "a", "token_type": given}).token_type == "Bearer"


def test_other_token_types_are_kept() -> None:
    assert parse({"access_token": "a", "token_type": "N_A"}).token_type == "N_A"


@pytest.mark.parametrize("value", [3600, "3600", " 3600 ", 3600.0, "3600.0"])
def test_expires_in_sets_expiry(value: object) -> None:
    cred = parse({"access_token": "a", "expires_in": value})
    assert cred.expires_at == NOW + timedelta(seconds=3600)


@pytest.mark.parametrize("value", [-1, "-5", MAX_EXPIRES_IN + 1, "1e300", "soon", True, [], {}, float("nan")])
def test_bad_expires_in_is_rejected(value: object) -> None:
    body = json.dumps({"access_token": "a", "expires_in": value}).encode()  # NaN is emitted as NaN
    with pytest.raises(UpstreamError, match="expires_in") as info:
        parse(body)
    assert info.value.status == 200 and not info.value.retryable


def test_jwt_exp_is_the_fallback_expiry() -> None:
    exp = int((NOW + timedelta(minutes=5)).timestamp())
    assert parse({"access_token": jwt({"exp": exp, "sub": "u"})}).expires_at == NOW + timedelta(minutes=5)


def test_expires_in_wins_over_jwt_exp() -> None:
    token = jwt({"exp": int((NOW + timedelta(hours=9)).timestamp())})
    assert parse({"access_token": token, "expires_in": 60}).expires_at == NOW + timedelta(seconds=60)


@pytest.mark.parametrize(
    "token",
    [
        jwt({"sub": "no exp"}),
        jwt({"exp": "tomorrow"}),
        jwt({"exp": True}),
        jwt({"exp": 10**20}),
        "a.!!!not-base64!!!.c",
        "a." + base64.urlsafe_b64encode(b"[1,2]").decode().rstrip("=") + ".c",
        "a.b.c.d.e",  # JWE: payload encrypted
        "opaque-token",
    ],
)
def test_no_usable_jwt_exp_means_no_expiry(token: str) -> None:
    assert jwt_expiry(token) is None
    assert parse({"access_token": token}).expires_at is None


def test_refresh_token_becomes_a_secret() -> None:
    cred = parse({"access_token": "a", "refresh_token": "rt-1"})
    assert cred.refresh_token is not None and cred.refresh_token.reveal() == "rt-1"
    assert "rt-1" not in repr(cred)


def test_empty_refresh_token_is_absent() -> None:
    assert parse({"access_token": "a", "refresh_token": ""}).refresh_token is None


def test_non_string_refresh_token_is_rejected() -> None:
    with pytest.raises(UpstreamError, match="refresh_token"):
        parse({"access_token": "a", "refresh_token": 5})


@pytest.mark.parametrize(
    ("scope", "expected"),
    [("a b  c", ("a", "b", "c")), (["x", "y"], ("x", "y")), (None, ("read",)), ("", ("read",))],
)
def test_granted_scope_else_requested(scope: object, expected: tuple[str, ...]) -> None:
    body: dict[str, object] = {"access_token": "a"}
    if scope is not None:
        body["scope"] = scope
    assert parse(body).scopes == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json " + FAKE_SECRET.encode(), "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"", "malformed JSON"),
        (json.dumps([FAKE_SECRET]).encode(), "not an object"),
        (json.dumps(FAKE_SECRET).encode(), "not an object"),
        (json.dumps({"token": FAKE_SECRET}).encode(), "without access_token"),
        (json.dumps({"access_token": ""}).encode(), "without access_token"),
        (json.dumps({"access_token": 12345}).encode(), "without access_token"),
        (json.dumps({"access_token": None}).encode(), "without access_token"),
    ],
)
def test_malformed_success_bodies(body: bytes, message: str) -> None:
    with pytest.raises(UpstreamError, match=message) as info:
        parse(body)
    err = info.value
    assert err.status == 200 and err.oauth_error is None and not err.retryable
    assert FAKE_SECRET not in str(err) and FAKE_SECRET not in repr(err.to_dict())


@pytest.mark.parametrize("bad", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "a\x7fb", "a\tb", "tök", " a", "a "])
def test_access_token_with_control_characters_is_rejected(bad: str) -> None:
    with pytest.raises(UpstreamError, match="access_token"):
        parse({"access_token": bad})


@pytest.mark.parametrize("bad", ["Bearer\r\nX-Evil: 1", "Bea rer", "\n", "", 7])
def test_token_type_with_control_characters_is_rejected(bad: object) -> None:
    with pytest.raises(UpstreamError, match="token_type"):
        parse({"access_token": "a", "token_type": bad})


def test_refresh_token_with_newline_is_rejected() -> None:
    with pytest.raises(UpstreamError, match="refresh_token"):
        parse({"access_token": "a", "refresh_token": "r\nx"})


def test_error_in_a_200_is_an_error() -> None:
    # GitHub answers a bad code with 200 {"error": ...}.
    with pytest.raises(UpstreamError) as info:
        parse({"error": "invalid_grant", "error_description": FAKE_SECRET})
    assert info.value.oauth_error == "invalid_grant"
    assert FAKE_SECRET not in str(info.value)


def test_non_2xx_goes_through_the_error_mapping() -> None:
    with pytest.raises(UpstreamError) as info:
        parse({"error": "invalid_grant"}, status=400)
    assert (info.value.status, info.value.oauth_error) == (400, "invalid_grant")


def test_error_description_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps({
        "error": "invalid_client",
        "error_description": f"client secret {FAKE_SECRET} is wrong",
        "error_uri": f"https://as.example/{FAKE_SECRET}",
    }).encode()
    with caplog.at_level(logging.DEBUG):
        err = parse_error_response(401, {}, body)
        logging.getLogger("test").exception("failed: %s %r %s", err, err, err.to_dict())
    assert (err.status, err.oauth_error, err.retryable) == (401, "invalid_client", False)
    for text in (str(err), repr(err), repr(err.to_dict()), err.message, caplog.text):
        assert FAKE_SECRET not in text
    assert err.to_dict() == {
        "error": "upstream_error",
        "message": "authorization server error: status 401, invalid_client",
        "status": 401,
        "oauth_error": "invalid_client",
    }


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"error": FAKE_SECRET}).encode(),
        json.dumps({"error": "custom_code"}).encode(),
        json.dumps({"error": 42}).encode(),
        f"<html>{FAKE_SECRET}</html>".encode(),
        b"",
    ],
)
def test_unknown_or_missing_error_code_maps_to_none(body: bytes) -> None:
    err = parse_error_response(400, {}, body)
    assert err.oauth_error is None and err.status == 400
    assert FAKE_SECRET not in str(err) and FAKE_SECRET not in repr(err.to_dict())


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (401, False), (403, False), (404, False), (302, False),
    (408, True), (429, True), (500, True), (502, True), (503, True), (504, True),
])
def test_retryable_statuses(status: int, retryable: bool) -> None:
    assert parse_error_response(status, {}, b"").retryable is retryable


def test_temporarily_unavailable_is_retryable_even_as_400() -> None:
    err = parse_error_response(400, {}, b'{"error":"temporarily_unavailable"}')
    assert err.retryable and err.oauth_error == "temporarily_unavailable"


def test_retry_after_seconds_any_header_case() -> None:
    assert parse_error_response(429, {"retry-after": "3"}, b"").retry_after == 3.0
    assert parse_error_response(503, {"Retry-After": "7"}, b"").retry_after == 7.0


def test_retry_after_http_date_and_cap() -> None:
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", NOW) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", NOW) == 0.0  # in the past
    assert parse_retry_after("999999", NOW) == RETRY_AFTER_CAP
    assert parse_retry_after("Fri, 01 Jan 2027 00:00:00 GMT", NOW) == RETRY_AFTER_CAP
    err = parse_error_response(503, {"Retry-After": "Thu, 01 Jan 2026 12:00:10 GMT"}, b"", now=NOW)
    assert err.retry_after == 10.0


@pytest.mark.parametrize("value", [None, "", "soon", "-3", "1.5e9x"])
def test_unparseable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None
