"""Connect-flow state: single-use, short-lived, sealed, shared by every process.

Redis holds the state under a hash of its opaque id; the value (user, server,
PKCE verifier) is sealed with the *internal* key (never the transport key a
gateway holds, so a gateway cannot forge one) and bound to that key. ``take``
is atomic (GETDEL), so two concurrent callbacks with one state: exactly one
wins.

Next to a state live two short records of the browser-callback mode: the
browser binding (a digest of the cookie the link set, SET NX so a link binds
one browser only) and the authorization code awaiting the user's confirming
click. Live states are capped per group (one (user, server) pair): past the
cap the oldest are evicted with their records.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, Protocol

from .crypto import DecryptError, Sealer
from .keyspace import key_prefix

__all__ = ["StateStore", "RedisStateStore", "MemoryStateStore", "STATE_PREFIX", "STATE_GROUP_PREFIX", "BIND_SUFFIX",
           "state_key"]

STATE_PREFIX = "credbroker:connect:"
# Per (user, server) sorted set of live state keys, scored by creation time.
STATE_GROUP_PREFIX = "credbroker:connect-live:"
BIND_SUFFIX = ":b"  # the browser binding of a state lives at its key + this
_BIND = BIND_SUFFIX
_CODE = ":c"


class StateStore(Protocol):
    def put(self, state: str, data: dict[str, Any], ttl: int, group: str | None = None,
            cap: int | None = None) -> None: ...
    def peek(self, state: str) -> dict[str, Any] | None: ...
    def take(self, state: str) -> dict[str, Any] | None: ...
    def bind(self, state: str, digest: str, ttl: int) -> bool: ...
    def binding(self, state: str) -> str | None: ...
    def put_code(self, state: str, code: str, ttl: int) -> None: ...
    def take_code(self, state: str) -> str | None: ...
    def take_with_code(self, state: str) -> tuple[dict[str, Any] | None, str | None]: ...
    def discard_group(self, group: str) -> int: ...


def state_key(state: str) -> str:
    # The Redis key is a hash of the state, so a key listing never shows a live state.
    return key_prefix() + STATE_PREFIX + hashlib.sha256(state.encode()).hexdigest()


# Atomic put-and-cap: store the state, index it, drop expired index entries,
# then evict the oldest states (and their records) beyond the cap.
_PUT_CAPPED = """
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
local now = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]) * 1000)
local cap = tonumber(ARGV[4])
local n = redis.call('ZCARD', KEYS[1])
local evicted = 0
if n > cap then
  local old = redis.call('ZRANGE', KEYS[1], 0, n - cap - 1)
  for _, k in ipairs(old) do
    redis.call('DEL', k, k .. ARGV[5], k .. ARGV[6])
    redis.call('ZREM', KEYS[1], k)
    evicted = evicted + 1
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 1000)
return evicted
"""

_DISCARD_GROUP = """
local old = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, k in ipairs(old) do
  redis.call('DEL', k, k .. ARGV[1], k .. ARGV[2])
end
redis.call('DEL', KEYS[1])
return #old
"""


class RedisStateStore:
    """States in Redis: SET EX to create, GETDEL to consume."""

    def __init__(self, redis: Any, sealer: Sealer) -> None:
        self.redis = redis
        self.sealer = sealer
        self._put_capped = redis.register_script(_PUT_CAPPED)
        self._discard = redis.register_script(_DISCARD_GROUP)

    def put(self, state: str, data: dict[str, Any], ttl: int, group: str | None = None,
            cap: int | None = None) -> None:
        key = state_key(state)
        blob = self.sealer.seal_json(data, key)
        if group is None or cap is None:
            self.redis.set(key, blob, ex=ttl)
            return
        self._put_capped(keys=[key_prefix() + STATE_GROUP_PREFIX + group, key],
                         args=[blob, ttl, int(time.time() * 1000), cap, _BIND, _CODE])

    def _open(self, raw: bytes | None, key: str) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            value = self.sealer.open_json(raw, key)
        except (DecryptError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def peek(self, state: str) -> dict[str, Any] | None:
        key = state_key(state)
        return self._open(self.redis.get(key), key)

    def take(self, state: str) -> dict[str, Any] | None:
        key = state_key(state)
        pipe = self.redis.pipeline(transaction=True)
        pipe.getdel(key)
        pipe.delete(key + _BIND)
        raw, _ = pipe.execute()
        return self._open(raw, key)

    def bind(self, state: str, digest: str, ttl: int) -> bool:
        key = state_key(state) + _BIND
        return bool(self.redis.set(key, self.sealer.seal(digest.encode(), key), ex=ttl, nx=True))

    def binding(self, state: str) -> str | None:
        key = state_key(state) + _BIND
        return self._open_text(self.redis.get(key), key)

    def put_code(self, state: str, code: str, ttl: int) -> None:
        key = state_key(state) + _CODE
        self.redis.set(key, self.sealer.seal(code.encode(), key), ex=ttl)

    def take_code(self, state: str) -> str | None:
        key = state_key(state) + _CODE
        return self._open_text(self.redis.getdel(key), key)

    def _open_text(self, raw: bytes | None, key: str) -> str | None:
        """A sealed short text (binding digest, parked code); tampered or absent reads as None."""
        if raw is None:
            return None
        try:
            return self.sealer.open(raw, key).decode()
        except (DecryptError, UnicodeDecodeError):
            return None

    def take_with_code(self, state: str) -> tuple[dict[str, Any] | None, str | None]:
        """The state and its parked code in one transaction (a double click gets one pair)."""
        key = state_key(state)
        pipe = self.redis.pipeline(transaction=True)
        pipe.getdel(key)
        pipe.getdel(key + _CODE)
        pipe.delete(key + _BIND)
        raw, raw_code, _ = pipe.execute()
        code = None
        if raw_code is not None:
            try:
                code = self.sealer.open(raw_code, key + _CODE).decode()
            except (DecryptError, UnicodeDecodeError):
                code = None
        return self._open(raw, key), code

    def discard_group(self, group: str) -> int:
        return int(self._discard(keys=[key_prefix() + STATE_GROUP_PREFIX + group], args=[_BIND, _CODE]))

    def live_count(self, group: str) -> int:
        """How many states of the group still exist (for tests and metrics)."""
        keys = self.redis.zrange(key_prefix() + STATE_GROUP_PREFIX + group, 0, -1)
        return int(sum(self.redis.exists(k) for k in keys)) if keys else 0


class MemoryStateStore:
    """In-process states, for unit tests."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[float, Any]] = {}
        self._groups: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def _get(self, key: str, pop: bool = False) -> Any:
        item = self._data.pop(key, None) if pop else self._data.get(key)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]

    def put(self, state: str, data: dict[str, Any], ttl: int, group: str | None = None,
            cap: int | None = None) -> None:
        with self._lock:
            self._data[state] = (time.monotonic() + ttl, dict(data))
            if group is not None and cap is not None:
                live = [s for s in self._groups.get(group, []) if s in self._data] + [state]
                for old in live[:-cap]:
                    for suffix in ("", _BIND, _CODE):
                        self._data.pop(old + suffix, None)
                self._groups[group] = live[-cap:]

    def peek(self, state: str) -> dict[str, Any] | None:
        with self._lock:
            return self._get(state)  # type: ignore[no-any-return]

    def take(self, state: str) -> dict[str, Any] | None:
        with self._lock:
            self._data.pop(state + _BIND, None)
            return self._get(state, pop=True)  # type: ignore[no-any-return]

    def bind(self, state: str, digest: str, ttl: int) -> bool:
        with self._lock:
            if self._get(state + _BIND) is not None:
                return False
            self._data[state + _BIND] = (time.monotonic() + ttl, digest)
            return True

    def binding(self, state: str) -> str | None:
        with self._lock:
            return self._get(state + _BIND)  # type: ignore[no-any-return]

    def put_code(self, state: str, code: str, ttl: int) -> None:
        with self._lock:
            self._data[state + _CODE] = (time.monotonic() + ttl, code)

    def take_code(self, state: str) -> str | None:
        with self._lock:
            return self._get(state + _CODE, pop=True)  # type: ignore[no-any-return]

    def take_with_code(self, state: str) -> tuple[dict[str, Any] | None, str | None]:
        with self._lock:
            self._data.pop(state + _BIND, None)
            return self._get(state, pop=True), self._get(state + _CODE, pop=True)

    def discard_group(self, group: str) -> int:
        with self._lock:
            live = self._groups.pop(group, [])
            for old in live:
                for suffix in ("", _BIND, _CODE):
                    self._data.pop(old + suffix, None)
            return len(live)
