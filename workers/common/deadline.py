"""The caller's deadline, applied to every Redis socket operation on its path.

A resolve sets a per-thread deadline (``within``); the connection classes here
bound each connect, send and read of that thread by the time left, so a Redis
that accepts connections but never answers (paused, black-holed by a failover)
costs a caller at most its own timeout. Threads without a deadline (workers,
listeners) keep the plain socket timeouts. The kombu transports reuse the same
connection classes (``workers.celery.transport``), so publishing a flight task
obeys the deadline too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.sentinel import SentinelManagedConnection

__all__ = ["within", "grace", "remaining", "DeadlinePassed", "DeadlineConnection", "DeadlineSentinelConnection", "DeadlinePool"]

_local = threading.local()


class DeadlinePassed(redis.TimeoutError):
    """Raised when a Redis call is attempted after the caller's deadline
    (nothing was sent: Redis itself may be fine)."""


@contextmanager
def within(deadline: float) -> Iterator[None]:
    """Bound this thread's Redis calls by ``deadline`` (a ``time.monotonic()`` value)."""
    outer = getattr(_local, "deadline", None)
    _local.deadline = deadline if outer is None else min(outer, deadline)
    try:
        yield
    finally:
        _local.deadline = outer


@contextmanager
def grace(seconds: float) -> Iterator[None]:
    """A short fresh deadline, even past the caller's: for one cheap look at
    Redis on a failure path (explaining a timeout), bounded by ``seconds``."""
    outer = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = outer


def remaining() -> float | None:
    """Seconds left before this thread's deadline, or None when it has none."""
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


def _bounded(base: float | None) -> float | None:
    left = remaining()
    if left is None:
        return base
    if left <= 0:
        raise DeadlinePassed("the caller's deadline passed")
    return left if base is None else min(base, left)


class _DeadlineMixin:
    """Connect, send and read with at most the caller's remaining time."""

    _sock: Any
    socket_timeout: float | None
    _socket_connect_timeout: float | None

    def _connect(self) -> Any:
        base = self._socket_connect_timeout
        self._socket_connect_timeout = _bounded(base)
        try:
            return super()._connect()  # type: ignore[misc]
        finally:
            self._socket_connect_timeout = base

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if remaining() is None or self._sock is None:
            return super().send_packed_command(command, check_health)  # type: ignore[misc]
        self._sock.settimeout(_bounded(self.socket_timeout))
        try:
            return super().send_packed_command(command, check_health)  # type: ignore[misc]
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.socket_timeout)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if remaining() is None or self._sock is None:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        try:
            timeout = _bounded(self.socket_timeout)
        except DeadlinePassed:
            self.disconnect()  # type: ignore[attr-defined]  # a reply is pending: the socket is spent
            raise
        self._sock.settimeout(timeout)
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.socket_timeout)


class DeadlineConnection(_DeadlineMixin, redis.Connection):
    pass


class DeadlineSentinelConnection(_DeadlineMixin, SentinelManagedConnection):
    pass


class DeadlinePool(redis.BlockingConnectionPool):
    """Waits for a free connection no longer than the caller's remaining time."""

    @property  # type: ignore[override]
    def timeout(self) -> float | None:
        left = remaining()
        base = self._timeout
        if left is None:
            return base
        return max(0.0, left) if base is None else max(0.0, min(base, left))

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value
