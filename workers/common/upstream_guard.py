"""Per-server protection for authorization-server calls: a concurrency limit
and a circuit breaker, both cluster-wide in Redis.

A hung or failing token endpoint must not occupy every worker slot or be
hammered by every user's renewal. ``GuardedOAuth`` wraps the resolver's
OAuth port: before a call it takes a slot of the server's counting semaphore
and asks the breaker; when either refuses it raises ``UpstreamRefused`` (a
retryable ``UpstreamError`` without status), so the resolver serves the
still-valid credential stale, exactly as for a provider outage, and the
domain stays free of Redis and Celery.

Breaker: after ``failures`` consecutive transient failures (network errors,
timeouts, 5xx, 429, ``temporarily_unavailable``: the sender's retryable
class) across all users, the circuit opens for ``cooldown`` seconds; then one
probe call goes through (half-open) and its outcome closes or re-opens it.
Any answer that shows the server alive (success, or a permanent error such as
``invalid_grant``) closes it.

Limiter: a Redis sorted set of in-flight call tokens scored by their expiry;
a worker killed mid-call frees its slot when the token's expiry passes. A
call that finds the server at its limit waits for a slot only while the
server is moving (its youngest call started less than ``FLOW_SECONDS`` ago),
at most ``MAX_WAIT_SECONDS`` (``REFRESH_MAX_WAIT_SECONDS`` for a proactive
refresh, which has a still-valid credential to fall back on); a server whose
calls all hang is refused at once, so its callers cannot hold every worker
slot while they wait.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from broker.keyspace import key_prefix
from broker.clock import Clock, SystemClock
from broker.errors import UpstreamError
from broker.models import Credential
from broker.secret import Secret
from broker.servers import ServerConfig
from broker.settings import Settings

from .constants import PREFIX
from .metrics import cluster_incr, cluster_set

__all__ = ["BREAKER_PREFIX", "LIMIT_PREFIX", "GuardLimits", "ServerGuard", "GuardedOAuth", "UpstreamRefused",
           "ServerStatus", "CLOSED", "OPEN", "HALF_OPEN", "FLOW_SECONDS", "MAX_WAIT_SECONDS",
           "REFRESH_MAX_WAIT_SECONDS", "slot_wait"]

log = logging.getLogger(__name__)

# Hash per server key: state, consecutive failures, open_until (ms), opened count.
BREAKER_PREFIX = PREFIX + "breaker:"
# Sorted set per server key: in-flight call tokens scored by their expiry (ms).
LIMIT_PREFIX = PREFIX + "inflight:"

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# A server at its limit whose youngest call started longer ago than this is
# not moving: callers are refused instead of waiting for a slot.
FLOW_SECONDS = 1.0
# Longest a flight waits for a slot of a moving server.
MAX_WAIT_SECONDS = 5.0
REFRESH_MAX_WAIT_SECONDS = 0.25
_POLL_SECONDS = 0.02

# How long the current flight may wait for a slot (set per flight by the task).
slot_wait: contextvars.ContextVar[float] = contextvars.ContextVar("slot_wait", default=MAX_WAIT_SECONDS)
_STATE_GAUGE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

# KEYS[1] breaker hash. ARGV: now_ms, probe_ms. Returns {verdict, ms_left}:
# verdict 1 = call, 2 = call as the half-open probe, 0 = refuse.
_ALLOW = """
local state = redis.call('hget', KEYS[1], 'state')
if state == false or state == 'closed' then return {1, 0} end
local now = tonumber(ARGV[1])
local until_ms = tonumber(redis.call('hget', KEYS[1], 'open_until') or '0')
if now < until_ms then return {0, until_ms - now} end
-- cool-down over (or the probe's lease lapsed): one caller becomes the probe
redis.call('hset', KEYS[1], 'state', 'half_open', 'open_until', now + tonumber(ARGV[2]))
return {2, 0}
"""

# KEYS[1] breaker hash. ARGV: outcome ('ok' | 'fail'), threshold, now_ms, cooldown_ms, ttl_s.
# Returns the new state.
_RECORD = """
if ARGV[1] == 'ok' then
  local state = redis.call('hget', KEYS[1], 'state')
  if state == false then return 'closed' end
  redis.call('hset', KEYS[1], 'state', 'closed', 'failures', 0)
  redis.call('expire', KEYS[1], tonumber(ARGV[5]))
  return 'closed'
end
local state = redis.call('hget', KEYS[1], 'state') or 'closed'
local n = redis.call('hincrby', KEYS[1], 'failures', 1)
if state == 'half_open' or (state == 'closed' and n >= tonumber(ARGV[2])) then
  redis.call('hset', KEYS[1], 'state', 'open', 'open_until', tonumber(ARGV[3]) + tonumber(ARGV[4]))
  redis.call('hincrby', KEYS[1], 'opened', 1)
  state = 'open'
elseif state ~= 'open' then
  redis.call('hset', KEYS[1], 'state', 'closed')
end
redis.call('expire', KEYS[1], tonumber(ARGV[5]))
return state
"""

# KEYS[1] in-flight set. ARGV: now_ms, expiry_ms, limit, token, call_ms. 1 = slot taken.
# Scores use the callers' clock; the key's own TTL (Redis's clock) only cleans up.
_TAKE_SLOT = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('zadd', KEYS[1], ARGV[2], ARGV[4])
redis.call('pexpire', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1] in-flight set. ARGV: now_ms, expiry_ms, limit, call_ms, token... Takes
# as many of the tokens as the limit leaves room for; returns how many (the first n).
_TAKE_SLOTS = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
local n = math.min(tonumber(ARGV[3]) - redis.call('zcard', KEYS[1]), #ARGV - 4)
if n <= 0 then return 0 end
for i = 1, n do redis.call('zadd', KEYS[1], ARGV[2], ARGV[4 + i]) end
redis.call('pexpire', KEYS[1], ARGV[4])
return n
"""


class UpstreamRefused(UpstreamError):
    """Raised when the broker itself declined to call a server (circuit open, or
    the server's concurrency limit reached); retryable, never a provider answer."""

    def __init__(self, refusal: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, retryable=True, retry_after=retry_after)
        self.refusal = refusal


@dataclass(frozen=True)
class GuardLimits:
    """The guard's numbers, from settings."""

    max_concurrency: int
    failures: int
    cooldown_seconds: float
    call_seconds: float  # worst-case length of one guarded call (timeouts and retry budget)

    @classmethod
    def from_settings(cls, s: Settings) -> GuardLimits:
        limit = s.server_max_concurrency or max(1, s.worker_slots // 2)
        call = s.http_connect_timeout + s.http_read_timeout + s.provider_retry_seconds + 5.0
        return cls(limit, s.breaker_failures, s.breaker_cooldown_seconds, call)


@dataclass(frozen=True)
class ServerStatus:
    """One server's breaker and limiter state, as ``servers status`` shows it."""

    state: str
    failures: int
    open_seconds_left: float
    opened_total: int
    in_flight: int
    limit: int


class ServerGuard:
    """Breaker and limiter operations on Redis; every method names the server by key."""

    def __init__(self, client: redis.Redis, limits: GuardLimits, clock: Clock | None = None) -> None:
        self.client = client
        self.limits = limits
        self.clock = clock or SystemClock()
        self._allow = client.register_script(_ALLOW)
        self._record = client.register_script(_RECORD)
        self._take = client.register_script(_TAKE_SLOT)
        self._take_many = client.register_script(_TAKE_SLOTS)

    def _now_ms(self) -> int:
        return int(self.clock.now().timestamp() * 1000)

    @property
    def _call_ms(self) -> int:
        return int(self.limits.call_seconds * 1000)

    def allow(self, server_key: str) -> tuple[int, float]:
        """(1 call | 2 call as the probe | 0 refuse, seconds until the cool-down ends)."""
        verdict, left = self._allow(keys=[key_prefix() + BREAKER_PREFIX + server_key], args=[self._now_ms(), self._call_ms])
        return int(verdict), int(left) / 1000.0

    def record(self, server_key: str, ok: bool) -> str:
        """Record one real call's outcome; returns the breaker's state after it."""
        ttl = int(max(3600, self.limits.cooldown_seconds * 10))
        state = self._record(keys=[key_prefix() + BREAKER_PREFIX + server_key],
                             args=["ok" if ok else "fail", self.limits.failures, self._now_ms(),
                                   int(self.limits.cooldown_seconds * 1000), ttl])
        return state.decode() if isinstance(state, bytes) else str(state)

    def take_slot(self, server_key: str) -> str | None:
        """A token for one in-flight call, or None when the server is at its limit."""
        token = uuid.uuid4().hex
        now = self._now_ms()
        if self._take(keys=[key_prefix() + LIMIT_PREFIX + server_key], args=[now, now + self._call_ms,
                                                              self.limits.max_concurrency, token, self._call_ms]):
            return token
        return None

    def take_slots(self, server_key: str, wanted: int) -> list[str]:
        """Tokens for up to ``wanted`` in-flight calls at once (a bulk warm's
        wave): as many as the server's limit leaves free, maybe none."""
        if wanted <= 0:
            return []
        tokens = [uuid.uuid4().hex for _ in range(wanted)]
        now = self._now_ms()
        taken = self._take_many(keys=[key_prefix() + LIMIT_PREFIX + server_key],
                                args=[now, now + self._call_ms, self.limits.max_concurrency, self._call_ms, *tokens])
        return tokens[:int(taken)]

    def release_slots(self, server_key: str, tokens: list[str]) -> None:
        if tokens:
            self.client.zrem(key_prefix() + LIMIT_PREFIX + server_key, *tokens)

    def moving(self, server_key: str) -> bool:
        """Its youngest in-flight call started within FLOW_SECONDS (or none is in flight)."""
        youngest = self.client.zrange(key_prefix() + LIMIT_PREFIX + server_key, -1, -1, withscores=True)
        if not youngest:
            return True
        started_ms = youngest[0][1] - self._call_ms
        return self._now_ms() - started_ms < FLOW_SECONDS * 1000

    def blocked(self, server_key: str) -> bool:
        """A call now would be refused at once: circuit open, or at its limit and not moving.
        The beat sends no refresh for such a server."""
        if self.is_open(server_key):
            return True
        key = key_prefix() + LIMIT_PREFIX + server_key
        in_flight = self.client.zcount(key, self._now_ms(), "+inf")
        return bool(in_flight >= self.limits.max_concurrency and not self.moving(server_key))

    def release_slot(self, server_key: str, token: str) -> None:
        self.client.zrem(key_prefix() + LIMIT_PREFIX + server_key, token)

    def is_open(self, server_key: str) -> bool:
        """Open and cooling down, or half-open with its probe running: a call now is refused."""
        raw = self.client.hmget(key_prefix() + BREAKER_PREFIX + server_key, ["state", "open_until"])
        return raw[0] in (b"open", b"half_open") and int(raw[1] or 0) > self._now_ms()

    def status(self, server_key: str) -> ServerStatus:
        raw = self.client.hmget(key_prefix() + BREAKER_PREFIX + server_key, ["state", "failures", "open_until", "opened"])
        now = self._now_ms()
        in_flight = self.client.zcount(key_prefix() + LIMIT_PREFIX + server_key, now, "+inf")
        state = raw[0].decode() if raw[0] else CLOSED
        left = max(0.0, (int(raw[2] or 0) - now) / 1000.0) if state == OPEN else 0.0
        return ServerStatus(state, int(raw[1] or 0), left, int(raw[3] or 0), int(in_flight),
                            self.limits.max_concurrency)


class GuardedOAuth:
    """The OAuth port with per-server limiter and breaker in front of ``refresh``
    and ``mint`` (the calls flights make); everything else passes through."""

    def __init__(self, inner: Any, guard: ServerGuard) -> None:
        self.inner = inner
        self.guard = guard

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def refresh(self, server: ServerConfig, credential: Credential, **options: Any) -> Credential:
        if credential.refresh_token is None:
            return self.inner.refresh(server, credential, **options)  # raises before any call
        return self._guarded(server, lambda: self.inner.refresh(server, credential, **options))

    def mint(self, server: ServerConfig, subject_token: Secret, **options: Any) -> Credential:
        return self._guarded(server, lambda: self.inner.mint(server, subject_token, **options))

    def _guarded(self, server: ServerConfig, call: Callable[[], Credential]) -> Credential:
        with self._admitted(server):
            try:
                result = call()
            except UpstreamError as exc:
                self.record_outcome(server, ok=not exc.retryable)
                raise
            self.record_outcome(server, ok=True)
            return result

    @contextmanager
    def _admitted(self, server: ServerConfig) -> Iterator[None]:
        try:
            verdict, left = self.guard.allow(server.key)
            token = self._wait_for_slot(server) if verdict else None
        except redis.RedisError:
            # The guard protects capacity, not correctness: without Redis, call.
            log.warning("server guard unavailable for server %s: calling unguarded", server.name)
            yield
            return
        if not verdict:
            cluster_incr(self.guard.client, "credbroker_server_refusals_total", server=server.name,
                         reason="circuit_open")
            raise UpstreamRefused("circuit_open", "authorization server circuit open: calls paused after "
                                  "repeated failures", retry_after=left)
        if token is None:
            if verdict == 2:
                self.give_back_probe(server)
            cluster_incr(self.guard.client, "credbroker_server_refusals_total", server=server.name,
                         reason="server_busy")
            raise UpstreamRefused("server_busy", "authorization server busy: its concurrency limit is reached")
        try:
            yield
        finally:
            try:
                self.guard.release_slot(server.key, token)
            except redis.RedisError:
                pass  # the token's expiry frees the slot

    def _wait_for_slot(self, server: ServerConfig) -> str | None:
        deadline = time.monotonic() + slot_wait.get()
        while True:
            token = self.guard.take_slot(server.key)
            if token is not None or time.monotonic() >= deadline or not self.guard.moving(server.key):
                return token
            time.sleep(_POLL_SECONDS)

    def give_back_probe(self, server: ServerConfig) -> None:
        # We became the probe but cannot call: let the next caller probe at once.
        try:
            self.guard.client.hset(key_prefix() + BREAKER_PREFIX + server.key, mapping={"state": OPEN, "open_until": 0})
        except redis.RedisError:
            pass

    def record_outcome(self, server: ServerConfig, ok: bool) -> None:
        """One call's outcome into the breaker (and its gauge)."""
        try:
            state = self.guard.record(server.key, ok)
        except redis.RedisError:
            return
        cluster_set(self.guard.client, "credbroker_server_circuit_state", _STATE_GAUGE.get(state, 0),
                    server=server.name)
        if not ok and state == OPEN:
            log.warning("circuit open for server %s: calls paused for %.0fs", server.name,
                        self.guard.limits.cooldown_seconds)
