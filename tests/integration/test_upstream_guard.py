"""The per-server limiter and circuit breaker on a real Redis (no workers).

Each test uses a server of its own (random URL, so a random key) and never
flushes, so runs sharing the unit tests' Redis database do not meet.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from broker.clock import FakeClock
from broker.errors import UpstreamError
from broker.models import Credential, ObtainedVia
from broker.secret import Secret
from broker.servers import ServerConfig, parse_servers
from tests.cluster import redis_available
from tests.conftest import REDIS_TEST_URL, missing_service
from workers.upstream_guard import (
    CLOSED, FLOW_SECONDS, HALF_OPEN, OPEN, GuardedOAuth, GuardLimits, ServerGuard, UpstreamRefused, slot_wait,
)

pytestmark = pytest.mark.integration

LIMITS = GuardLimits(max_concurrency=2, failures=3, cooldown_seconds=30, call_seconds=20)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    if not redis_available(REDIS_TEST_URL):
        missing_service("Redis at 127.0.0.1:6379")
    r = redis.Redis.from_url(REDIS_TEST_URL)
    yield r
    r.close()


def a_server() -> ServerConfig:
    registry = parse_servers({"servers": [{
        "name": "up", "url": f"https://{uuid.uuid4().hex}.upstream.test/mcp",
        "auth_broker": {"mode": "token_exchange", "token_endpoint": "http://127.0.0.1:9/token",
                        "client_id": "c", "client_secret": "s", "audience": "a"}}]})
    return registry.get_server("up")


class Provider:
    """Stands in for OAuthClient (the provider-facing behaviour is tested with
    real servers in test_isolation.py); answers from a script."""

    def __init__(self) -> None:
        self.calls = 0
        self.next: list[UpstreamError | None] = []

    def mint(self, server: ServerConfig, subject: Secret, *, retry: bool = True) -> Credential:
        self.calls += 1
        outcome = self.next.pop(0) if self.next else None
        if outcome is not None:
            raise outcome
        return Credential(Secret("cbtest-guard-minted-0123456789"), ObtainedVia.TOKEN_EXCHANGE)

    def endpoints(self, server: ServerConfig) -> str:
        return "passed through"


def test_limiter_counts_in_flight_calls_and_a_dead_callers_slot_expires(client: redis.Redis) -> None:
    clock = FakeClock()
    guard = ServerGuard(client, LIMITS, clock)
    key = a_server().key
    a, b = guard.take_slot(key), guard.take_slot(key)
    assert a and b and guard.take_slot(key) is None
    assert guard.status(key).in_flight == 2
    guard.release_slot(key, a)
    c = guard.take_slot(key)
    assert c is not None
    # b's and c's holders die without releasing: their slots come back once
    # the worst-case call length has passed.
    clock.advance(LIMITS.call_seconds + 1)
    assert guard.take_slot(key) and guard.take_slot(key)
    assert guard.take_slot(key) is None


def test_breaker_opens_after_consecutive_transient_failures_then_probes(client: redis.Redis) -> None:
    clock = FakeClock()
    guard = ServerGuard(client, LIMITS, clock)
    key = a_server().key
    assert guard.allow(key) == (1, 0.0)
    guard.record(key, ok=False)
    guard.record(key, ok=False)
    guard.record(key, ok=True)  # an answer resets the count: failures must be consecutive
    assert guard.record(key, ok=False) == CLOSED
    assert guard.record(key, ok=False) == CLOSED
    assert guard.record(key, ok=False) == OPEN
    verdict, left = guard.allow(key)
    assert verdict == 0 and 29 < left <= 30
    assert guard.is_open(key) and guard.status(key).state == OPEN
    clock.advance(30)
    assert guard.allow(key)[0] == 2  # the probe
    assert guard.allow(key)[0] == 0  # everyone else waits for it
    assert guard.status(key).state == HALF_OPEN
    assert guard.record(key, ok=False) == OPEN  # a failed probe re-opens at once
    assert guard.allow(key)[0] == 0
    clock.advance(30)
    assert guard.allow(key)[0] == 2
    assert guard.record(key, ok=True) == CLOSED
    assert guard.allow(key)[0] == 1
    assert guard.status(key).opened_total == 2


def test_a_probe_that_never_reports_is_replaced(client: redis.Redis) -> None:
    clock = FakeClock()
    guard = ServerGuard(client, LIMITS, clock)
    key = a_server().key
    for _ in range(3):
        guard.record(key, ok=False)
    clock.advance(30)
    assert guard.allow(key)[0] == 2  # this probe's worker is killed
    clock.advance(LIMITS.call_seconds + 1)
    assert guard.allow(key)[0] == 2


def test_guarded_port_refuses_without_calling_and_counts_only_transient_failures(client: redis.Redis) -> None:
    clock = FakeClock()
    guard = ServerGuard(client, LIMITS, clock)
    server = a_server()
    provider = Provider()
    port = GuardedOAuth(provider, guard)
    subject = Secret("cbtest-guard-subject-0123456789")
    assert port.endpoints(server) == "passed through"
    port.mint(server, subject, retry=False)  # the port's options pass through
    # permanent answers show the server alive: they never open the circuit
    provider.next = [UpstreamError(status=400, oauth_error="invalid_grant")] * 5
    for _ in range(5):
        with pytest.raises(UpstreamError):
            port.mint(server, subject)
    assert guard.status(server.key).state == CLOSED
    provider.next = [UpstreamError("timed out", retryable=True)] * 3
    for _ in range(3):
        with pytest.raises(UpstreamError):
            port.mint(server, subject)
    calls = provider.calls
    with pytest.raises(UpstreamRefused) as refused:
        port.mint(server, subject)
    assert provider.calls == calls  # refused without calling
    exc = refused.value
    assert (exc.refusal, exc.retryable, exc.status, exc.code) == ("circuit_open", True, None, "upstream_error")
    assert exc.retry_after is not None and exc.retry_after > 0
    assert guard.status(server.key).in_flight == 0  # every slot given back
    clock.advance(31)
    assert port.mint(server, subject).access_token.reveal().startswith("cbtest-guard-minted")  # the probe
    assert guard.status(server.key).state == CLOSED


def test_at_its_limit_a_moving_server_is_waited_for_and_a_stuck_one_refused(client: redis.Redis) -> None:
    clock = FakeClock()
    guard = ServerGuard(client, LIMITS, clock)
    server = a_server()
    provider = Provider()
    port = GuardedOAuth(provider, guard)
    subject = Secret("cbtest-guard-subject-0123456789")
    held = [guard.take_slot(server.key), guard.take_slot(server.key)]  # two calls in flight elsewhere
    # They just started: the call waits, and gets the slot one of them gives back.
    threading.Timer(0.2, lambda: guard.release_slot(server.key, held[0])).start()  # type: ignore[arg-type]
    t0 = time.monotonic()
    port.mint(server, subject)
    assert provider.calls == 1 and 0.15 < time.monotonic() - t0 < 2
    assert not guard.blocked(server.key)
    # Both slots held by calls that started FLOW_SECONDS ago and never ended: refused at once.
    guard.take_slot(server.key)
    clock.advance(FLOW_SECONDS + 0.5)
    assert guard.blocked(server.key)
    t0 = time.monotonic()
    with pytest.raises(UpstreamRefused) as refused:
        port.mint(server, subject)
    assert time.monotonic() - t0 < 0.5
    assert refused.value.refusal == "server_busy" and provider.calls == 1
    # A moving server at its limit is waited for at most slot_wait.
    guard.release_slot(server.key, held[1])  # type: ignore[arg-type]
    guard.take_slot(server.key)  # full again, and this one is young
    token = slot_wait.set(0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(UpstreamRefused):
            port.mint(server, subject)
        assert 0.25 < time.monotonic() - t0 < 1.5
    finally:
        slot_wait.reset(token)
