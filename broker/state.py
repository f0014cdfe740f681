"""Connect-flow state: single-use, short-lived, sealed, shared by every process.

Redis holds the state under its opaque id; the value (user, server, PKCE
verifier) is sealed with the transport key and bound to that id. ``take``
is atomic (GETDEL), so two concurrent callbacks with one state: exactly one
wins.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, Protocol

from .crypto import DecryptError, Sealer
from .keyspace import key_prefix

__all__ = ["StateStore", "RedisStateStore", "MemoryStateStore", "STATE_PREFIX", "state_key"]

STATE_PREFIX = "credbroker:connect:"


class StateStore(Protocol):
    def put(self, state: str, data: dict[str, Any], ttl: int) -> None: ...
    def take(self, state: str) -> dict[str, Any] | None: ...


def state_key(state: str) -> str:
    # The Redis key is a hash of the state, so a key listing never shows a live state.
    return key_prefix() + STATE_PREFIX + hashlib.sha256(state.encode()).hexdigest()


class RedisStateStore:
    """States in Redis: SET EX to create, GETDEL to consume."""

    def __init__(self, redis: Any, sealer: Sealer) -> None:
        self.redis = redis
        self.sealer = sealer

    def put(self, state: str, data: dict[str, Any], ttl: int) -> None:
        key = state_key(state)
        self.redis.set(key, self.sealer.seal_json(data, key), ex=ttl)

    def take(self, state: str) -> dict[str, Any] | None:
        key = state_key(state)
        raw = self.redis.getdel(key)
        if raw is None:
            return None
        try:
            value = self.sealer.open_json(raw, key)
        except (DecryptError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None


class MemoryStateStore:
    """In-process states, for unit tests."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def put(self, state: str, data: dict[str, Any], ttl: int) -> None:
        with self._lock:
            self._data[state] = (time.monotonic() + ttl, dict(data))

    def take(self, state: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._data.pop(state, None)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]
