"""The httpx sender: retries, budget, body cap, error mapping, no secrets in logs."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl

import httpx
import pytest

from broker.errors import UpstreamError
from broker.oauth.forms import TokenRequest
from broker.oauth.sender import MAX_BODY_BYTES, USER_AGENT, TokenEndpointSender, make_http_client
from broker.settings import Settings

URL = "https://as.example/token"
SECRETS = ("subject-SECRET-1", "client-SECRET-2", "access-SECRET-3", "describe-SECRET-4")
REQ = TokenRequest(
    url=URL,
    form={"grant_type": "refresh_token", "refresh_token": SECRETS[0], "client_secret": SECRETS[1]},
    headers={"Authorization": "Basic Y2xpZW50LVNFQ1JFVC0y"},
)
OK = json.dumps({"access_token": SECRETS[2]}).encode()
# Nothing in an exchange is spent by sending it: its timeouts may be retried.
EXCHANGE = TokenRequest(
    url=URL,
    form={"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": SECRETS[0],
          "client_secret": SECRETS[1]},
    headers={},
)


class FakeTime:
    """Monotonic time that only moves when the sender sleeps (or a test says so)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


Handler = Callable[[httpx.Request], httpx.Response]


class Body(httpx.SyncByteStream):
    """A body that arrives as a stream, like one from a real connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data


Step = tuple[int, bytes, dict[str, str]] | Exception


def resp(status: int, body: bytes = b"", **headers: str) -> Step:
    return status, body, {k.replace("_", "-"): v for k, v in headers.items()}


def scripted(*steps: Step) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering with ``steps`` in order, repeating the last one."""
    seen: list[httpx.Request] = []
    queue = list(steps)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(step, Exception):
            raise step
        status, body, headers = step
        return httpx.Response(status, stream=Body(body), headers=headers)

    return handler, seen


def make_sender(
    handler: Handler, clock: FakeTime, *, retry_seconds: float = 10.0, max_attempts: int = 5,
) -> TokenEndpointSender:
    http = make_http_client(Settings(), transport=httpx.MockTransport(handler))
    return TokenEndpointSender(
        http, retry_seconds=retry_seconds, max_attempts=max_attempts,
        sleep=clock.sleep, monotonic=clock.monotonic, rand=lambda: 0.5,
    )



def test_posts_the_form_with_headers() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(200, OK, content_type="application/json"))
    status, headers, body = make_sender(handler, clock).send(REQ)
    assert (status, body) == (200, OK)
    assert headers["content-type"] == "application/json"
    request = seen[0]
    assert request.method == "POST" and str(request.url) == URL
    assert dict(parse_qsl(request.content.decode())) == REQ.form
    assert request.headers["Authorization"] == REQ.headers["Authorization"]
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["User-Agent"] == USER_AGENT and USER_AGENT.startswith("credential-broker/")
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Accept-Encoding"] == "identity"


def test_5xx_5xx_200_succeeds_after_two_sleeps() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(503), resp(500), resp(200, OK))
    assert make_sender(handler, clock).send(REQ)[0] == 200
    assert len(seen) == 3
    assert clock.sleeps == pytest.approx([0.1, 0.2])  # full jitter with rand=0.5


def test_429_retry_after_is_honoured() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(429, retry_after="3"), resp(200, OK))
    make_sender(handler, clock).send(REQ)
    assert clock.sleeps == [3.0] and len(seen) == 2


def test_budget_exhausted_raises_the_last_error() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(503), resp(503), resp(502, b'{"error":"server_error"}'), resp(200, OK))
    sender = make_sender(handler, clock, retry_seconds=0.5, max_attempts=10)
    with pytest.raises(UpstreamError) as info:
        sender.send(REQ)
    # sleeps 0.1, 0.2 (0.3 elapsed); the next backoff 0.4 does not fit in 0.2 left.
    assert clock.sleeps == pytest.approx([0.1, 0.2])
    assert len(seen) == 3
    err = info.value
    assert (err.status, err.oauth_error, err.retryable) == (502, "server_error", True)


def test_retry_after_beyond_the_budget_gives_up_at_once() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(429, retry_after="60"), resp(200, OK))
    with pytest.raises(UpstreamError) as info:
        make_sender(handler, clock).send(REQ)
    assert len(seen) == 1 and clock.sleeps == []
    assert info.value.retry_after == 60.0  # the caller can schedule its own retry


def test_max_attempts_bounds_the_calls() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(500))
    with pytest.raises(UpstreamError) as info:
        make_sender(handler, clock, max_attempts=3).send(REQ)
    assert len(seen) == 3 and len(clock.sleeps) == 2
    assert info.value.status == 500


def test_a_single_attempt_call_does_not_retry_and_keeps_retry_after() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(503, retry_after="2"), resp(200, OK))
    with pytest.raises(UpstreamError) as info:
        make_sender(handler, clock).send(REQ, max_attempts=1)
    assert len(seen) == 1 and clock.sleeps == []
    assert (info.value.status, info.value.retry_after) == (503, 2.0)  # for the credential's backoff
    # a per-call limit only lowers the configured one
    handler, seen = scripted(resp(500))
    with pytest.raises(UpstreamError):
        make_sender(handler, clock, max_attempts=2).send(REQ, max_attempts=9)
    assert len(seen) == 2


def test_time_spent_in_calls_counts_against_the_budget() -> None:
    clock = FakeTime()

    handler, seen = scripted(resp(503))

    def slow(request: httpx.Request) -> httpx.Response:
        clock.now += 4.0  # each call takes 4s of the 10s budget
        return handler(request)

    with pytest.raises(UpstreamError):
        make_sender(slow, clock).send(REQ)
    # 4s, sleep, 4s (8.1 elapsed), sleep, 4s: 12.3 elapsed, no budget left.
    assert len(seen) == 3 and len(clock.sleeps) == 2


def test_invalid_grant_is_not_retried() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(400, b'{"error":"invalid_grant","error_description":"x"}'))
    with pytest.raises(UpstreamError) as info:
        make_sender(handler, clock).send(REQ)
    assert len(seen) == 1 and clock.sleeps == []
    assert (info.value.status, info.value.oauth_error, info.value.retryable) == (400, "invalid_grant", False)


def test_timeouts_are_retried() -> None:
    clock = FakeTime()
    handler, seen = scripted(httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow"), resp(200, OK))
    assert make_sender(handler, clock).send(EXCHANGE)[2] == OK
    assert len(seen) == 3 and len(clock.sleeps) == 2


def test_a_refresh_that_may_have_arrived_is_not_sent_again() -> None:
    from broker.errors import UpstreamOutcomeUnknown

    for lost in (httpx.ReadTimeout("slow"), httpx.WriteTimeout("slow"), httpx.RemoteProtocolError("cut")):
        clock = FakeTime()
        handler, seen = scripted(lost, resp(200, OK))
        with pytest.raises(UpstreamOutcomeUnknown):
            make_sender(handler, clock).send(REQ)
        assert len(seen) == 1 and clock.sleeps == []  # presented once: its outcome is the server's secret
    # never reached the server: safe to send again
    clock = FakeTime()
    handler, seen = scripted(httpx.ConnectTimeout("slow"), httpx.ConnectError("refused"), resp(200, OK))
    assert make_sender(handler, clock).send(REQ)[2] == OK and len(seen) == 3


def test_timeouts_exhausted_raise_a_coarse_retryable_error() -> None:
    clock = FakeTime()
    handler, _ = scripted(httpx.ReadTimeout(f"read timed out {SECRETS[0]}"))
    with pytest.raises(UpstreamError) as info:
        make_sender(handler, clock, max_attempts=2).send(REQ)
    err = info.value
    assert (err.message, err.status, err.retryable) == ("authorization server timed out", None, True)
    assert err.__cause__ is None and err.__suppress_context__


def test_network_errors_are_retryable_and_coarse() -> None:
    clock = FakeTime()
    handler, seen = scripted(httpx.ConnectError("refused"))
    with pytest.raises(UpstreamError) as info:
        make_sender(handler, clock, max_attempts=2).send(REQ)
    assert info.value.message == "could not reach authorization server"
    assert info.value.status is None and info.value.retryable and len(seen) == 2


def test_unsupported_scheme_is_not_retried() -> None:
    clock = FakeTime()
    sender = TokenEndpointSender(
        httpx.Client(), retry_seconds=10, max_attempts=5, sleep=clock.sleep, monotonic=clock.monotonic
    )
    with pytest.raises(UpstreamError, match="invalid authorization server URL") as info:
        sender.send(TokenRequest(url="ftp://as.example/token", form={}, headers={}))
    assert not info.value.retryable and clock.sleeps == []


def test_redirects_are_not_followed() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(302, location="https://evil.example/token"))
    with pytest.raises(UpstreamError) as info:
        make_sender(handler, clock).send(REQ)
    assert info.value.status == 302 and not info.value.retryable and len(seen) == 1


class CountingStream(httpx.SyncByteStream):
    """2 MiB in 64 KiB chunks, counting how many were pulled."""

    def __init__(self, total: int = 2 * MAX_BODY_BYTES, chunk: int = 64 * 1024) -> None:
        self.total, self.chunk, self.pulled, self.closed = total, chunk, 0, False

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.total // self.chunk):
            self.pulled += 1
            yield b"x" * self.chunk

    def close(self) -> None:
        self.closed = True


def test_body_over_1_mib_is_refused_without_reading_the_rest() -> None:
    clock = FakeTime()
    stream = CountingStream()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=stream)

    with pytest.raises(UpstreamError, match="authorization server response too large") as info:
        make_sender(handler, clock).send(REQ)
    assert stream.pulled == MAX_BODY_BYTES // stream.chunk + 1  # 17 of 32 chunks
    assert stream.closed
    assert not info.value.retryable and len(seen) == 1


def test_declared_length_over_the_cap_is_refused_before_reading() -> None:
    clock = FakeTime()
    stream = CountingStream()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=stream, headers={"Content-Length": str(2 * MAX_BODY_BYTES)})

    with pytest.raises(UpstreamError, match="too large"):
        make_sender(handler, clock).send(REQ)
    assert stream.pulled == 0


def test_body_of_exactly_the_cap_is_accepted() -> None:
    clock = FakeTime()
    handler, _ = scripted(resp(200, b"x" * MAX_BODY_BYTES))
    assert len(make_sender(handler, clock).send(REQ)[2]) == MAX_BODY_BYTES


def test_bodies_already_in_memory_are_capped_too() -> None:
    # httpx pre-reads a Response built from bytes; the cap still applies.
    clock = FakeTime()
    big = httpx.MockTransport(lambda r: httpx.Response(200, content=b"x" * (MAX_BODY_BYTES + 1)))
    small = httpx.MockTransport(lambda r: httpx.Response(200, content=OK))
    for transport, expected in ((small, OK), (big, None)):
        sender = TokenEndpointSender(
            httpx.Client(transport=transport), retry_seconds=1, max_attempts=1,
            sleep=clock.sleep, monotonic=clock.monotonic,
        )
        if expected is None:
            with pytest.raises(UpstreamError, match="too large"):
                sender.send(REQ)
        else:
            assert sender.send(REQ)[2] == expected


def test_gzip_bodies_are_decoded_and_bombs_refused() -> None:
    clock = FakeTime()
    handler, _ = scripted(resp(200, gzip.compress(OK), content_encoding="gzip"))
    assert make_sender(handler, clock).send(REQ)[2] == OK
    bomb = gzip.compress(b"\0" * (8 * MAX_BODY_BYTES))
    assert len(bomb) < 64 * 1024
    handler, _ = scripted(resp(200, bomb, content_encoding="gzip"))
    with pytest.raises(UpstreamError, match="too large"):
        make_sender(handler, clock).send(REQ)


def test_unknown_content_encoding_is_refused() -> None:
    clock = FakeTime()
    handler, _ = scripted(resp(200, b"\x00\x01", content_encoding="br"))
    with pytest.raises(UpstreamError, match="content encoding"):
        make_sender(handler, clock).send(REQ)


def test_get_returns_non_retryable_statuses() -> None:
    clock = FakeTime()
    handler, seen = scripted(resp(404, b"nope"))
    status, _, body = make_sender(handler, clock).get("https://as.example/.well-known/x")
    assert (status, body, seen[0].method) == (404, b"nope", "GET")


def test_logs_carry_no_secrets(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeTime()
    error_body = json.dumps({"error": "invalid_grant", "error_description": SECRETS[3]}).encode()
    handler, _ = scripted(resp(503, error_body), httpx.ConnectTimeout(SECRETS[3]), resp(200, OK))
    with caplog.at_level(logging.DEBUG):
        make_sender(handler, clock).send(REQ)
        handler, _ = scripted(resp(400, error_body))
        with pytest.raises(UpstreamError) as info:
            make_sender(handler, clock).send(REQ)
        logging.getLogger("test").error("error: %s %r", info.value, info.value.to_dict())
    assert "as.example" in caplog.text and "grant=refresh_token" in caplog.text
    for secret in (*SECRETS, "Y2xpZW50LVNFQ1JFVC0y"):
        assert secret not in caplog.text
        assert secret not in str(info.value) and secret not in repr(info.value.to_dict())


def test_make_http_client_settings() -> None:
    settings = Settings(http_connect_timeout=2.5, http_read_timeout=7.0)
    with make_http_client(settings) as http:
        assert http.timeout.connect == 2.5 and http.timeout.read == 7.0
        assert http.timeout.write is not None and http.timeout.pool is not None
        assert http.follow_redirects is False
        assert http.headers["User-Agent"] == USER_AGENT


def test_from_settings_uses_retry_settings() -> None:
    settings = Settings(provider_retry_seconds=3.0, provider_max_attempts=2)
    with make_http_client(settings) as http:
        sender = TokenEndpointSender.from_settings(settings, http)
        assert sender._retry_seconds == 3.0 and sender._max_attempts == 2
