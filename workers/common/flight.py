"""Cluster-wide single-flight per (user, server).

The pair names a claim in Redis (``SET NX PX``) holding the random id of the
one task in flight. Losers read that id and wait for its result; the claim is
released by compare-and-delete once the result is stored; a waiter whose task
failed or vanished (its claim expired without a result) claims again.

Claims are per execution: a running task replaces the bare task id with
``task_id/nonce`` (a nonce per run), and its heartbeat and release compare that
full value. A redelivered copy of the same task id (the Redis transport
redelivers an unacknowledged message past its visibility timeout, running or
not) finds another nonce and stands down. Joiners still read the task id.

Claims tell callers whom to join; they are not what keeps two flights from
presenting one refresh token: that is the credential row's lease
(``broker.lease``), which holds even if Redis loses every key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from .constants import FLIGHT_HEARTBEAT_MS, RESULT_CHANNEL_PREFIX, TASK_ID_PREFIX

__all__ = ["Claims", "FlightGuard", "ResultWaiter", "new_task_id", "execution_value", "task_of", "finished_task",
           "CAS_DELETE", "READY"]

log = logging.getLogger(__name__)

# Delete if the value is ours. A bare task id (the sender's, or a caller done
# with a finished task) also matches any execution of that task; an execution's
# full value matches only itself.
_CAS_DELETE = (
    "local cur = redis.call('get', KEYS[1]) "
    "if cur == false then return 0 end "
    "if cur == ARGV[1] or (string.find(ARGV[1], '/', 1, true) == nil "
    "and string.sub(cur, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '/') then return redis.call('del', KEYS[1]) end "
    "return 0"
)
_CAS_EXTEND = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
# Enter an execution: take a free claim, or the bare task id the sender set, as
# task_id/nonce; confirm our own value; refuse anything else (another execution
# of this task id, or another task). ARGV: full value, task id, TTL.
_ENTER = (
    "local cur = redis.call('get', KEYS[1]) "
    "if cur == false or cur == ARGV[2] then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[3]) return 1 end "
    "if cur == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[3]) return 1 end "
    "return 0"
)
_SEP = "/"
_READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
# Public names for the async client, which shares the script and the states.
CAS_DELETE = _CAS_DELETE
READY = _READY


def new_task_id() -> str:
    return TASK_ID_PREFIX + uuid.uuid4().hex


def execution_value(task_id: str) -> str:
    """The claim value of one execution of ``task_id`` (also its lease owner)."""
    return task_id + _SEP + uuid.uuid4().hex[:16]


def finished_task(msg: dict[str, Any], skip: int) -> str | None:
    """The task id a result-channel message announces as finished, else None
    (``skip``: the channel prefix's length)."""
    channel = msg["channel"]
    channel = channel.decode() if isinstance(channel, bytes) else channel
    try:
        status = json.loads(msg["data"]).get("status")
    except (ValueError, AttributeError):
        return None
    return channel[skip:] if status in _READY else None


def task_of(value: str) -> str:
    """The task id in a claim value, bare or per execution."""
    return value.split(_SEP, 1)[0]


class Claims:
    """The claim operations, as atomic Redis scripts."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._delete = client.register_script(_CAS_DELETE)
        self._extend = client.register_script(_CAS_EXTEND)
        self._enter = client.register_script(_ENTER)

    def claim(self, key: str, task_id: str, ttl_ms: int) -> bool:
        return bool(self.client.set(key, task_id, nx=True, px=ttl_ms))

    def value(self, key: str) -> str | None:
        """The raw claim value: a bare task id, or ``task_id/nonce`` once running."""
        value = self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    def holder(self, key: str) -> str | None:
        """The task id to join (whichever execution of it runs)."""
        value = self.value(key)
        return None if value is None else task_of(value)

    def release(self, key: str, value: str) -> bool:
        """Compare-and-delete: an execution's value frees only that execution's
        claim; a bare task id frees the task's claim, whichever run holds it."""
        return bool(self._delete(keys=[key], args=[value]))

    def extend(self, key: str, value: str, ttl_ms: int) -> bool:
        return bool(self._extend(keys=[key], args=[value, ttl_ms]))

    def enter(self, key: str, value: str, ttl_ms: int) -> bool:
        """Take the claim for one execution (``value`` from ``execution_value``)."""
        return bool(self._enter(keys=[key], args=[value, task_of(value), ttl_ms]))

    # Many pairs in one round trip (a bulk warm's batch).

    def claim_many(self, claims: list[tuple[str, str]], ttl_ms: int) -> list[bool]:
        """``claim`` for each (key, value), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for key, value in claims:
            pipe.set(key, value, nx=True, px=ttl_ms)
        return [bool(r) for r in pipe.execute()] if claims else []

    def extend_many(self, claims: list[tuple[str, str]], ttl_ms: int) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key, value in claims:
            self._extend(keys=[key], args=[value, ttl_ms], client=pipe)
        return [bool(r) for r in pipe.execute()] if claims else []

    def release_many(self, claims: list[tuple[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        self.queue_releases(pipe, claims)
        if claims:
            pipe.execute()

    def queue_releases(self, pipe: Any, claims: list[tuple[str, str]]) -> None:
        """``release`` for each (key, value), queued on a caller's pipeline (same Redis)."""
        for key, value in claims:
            self._delete(keys=[key], args=[value], client=pipe)


class FlightGuard:
    """Held by a running task: proves it owns the flight and keeps the claim alive.

    ``claims`` should use a Redis client with a short socket timeout: one stalled
    extension must be noticed before the claim can expire. Once an extension
    fails or comes too late, ``holds()`` is False for good, and the task must not
    ask an authorization server for anything (another flight may own the pair).
    """

    def __init__(self, claims: Claims, key: str, task_id: str, ttl_ms: int = FLIGHT_HEARTBEAT_MS) -> None:
        self.claims = claims
        self.key = key
        self.task_id = task_id
        # This execution: its claim value and the owner of any lease it takes.
        self.value = execution_value(task_id)
        self.ttl_ms = ttl_ms
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._confirmed_at = 0.0
        self._thread: threading.Thread | None = None

    def enter(self) -> bool:
        """True if this task holds the flight (a superseded redelivery does not)."""
        if not self.claims.enter(self.key, self.value, self.ttl_ms):
            return False
        self._confirmed_at = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="flight-heartbeat", daemon=True)
        self._thread.start()
        return True

    def holds(self) -> bool:
        """Still the pair's one flight: confirmed within most of the claim's TTL."""
        fresh = time.monotonic() - self._confirmed_at < self.ttl_ms / 1000.0 * 0.75
        return fresh and not self._lost.is_set()

    def _beat(self) -> None:
        interval = self.ttl_ms / 3000.0
        while not self._stop.wait(interval):
            try:
                ok = self.claims.extend(self.key, self.value, self.ttl_ms)
            except redis.RedisError:
                # Unknown whether it landed: keep trying while the margin lasts.
                log.warning("flight heartbeat: Redis unavailable")
                if not self.holds():
                    self._lost.set()
                    return
                continue
            if not ok:
                self._lost.set()
                return
            self._confirmed_at = time.monotonic()

    def exit(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


class ResultWaiter:
    """Waits for flight results with one Redis subscription per process.

    One listener thread pattern-subscribes to the result channels of flight
    tasks and wakes the threads waiting on them; every wait also reads the
    stored result directly, so a result published before the wait began is
    never missed.
    """

    def __init__(self, client: redis.Redis, get_meta: Callable[[str], dict[str, Any] | None],
                 channel_prefix: str = RESULT_CHANNEL_PREFIX) -> None:
        self.client = client
        self.get_meta = get_meta
        # The result channels' prefix: Celery's, behind the deployment's namespace.
        self.channel_prefix = channel_prefix
        self._lock = threading.Lock()
        self._waiters: dict[str, list[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen, name="credbroker-results", daemon=True)
                self._thread.start()

    def _listen(self) -> None:
        pattern = self.channel_prefix + TASK_ID_PREFIX + "*"
        skip = len(self.channel_prefix)
        delay = 0.05
        while not self._stopped.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(pattern)
                self._wake_all()  # results may have landed while we were away
                delay = 0.05
                while not self._stopped.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if not msg or msg.get("type") != "pmessage":
                        continue
                    task_id = finished_task(msg, skip)
                    if task_id is not None:
                        self._wake(task_id)
            except (redis.RedisError, OSError, ValueError):
                # Redis went away (or the client is closing): back off, resubscribe.
                self._stopped.wait(delay)
                delay = min(delay * 2, 2.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001
                    pass

    def _wake(self, task_id: str) -> None:
        with self._lock:
            events = list(self._waiters.get(task_id, ()))
        for ev in events:
            ev.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [ev for evs in self._waiters.values() for ev in evs]
        for ev in events:
            ev.set()

    def wait(self, task_id: str, deadline: float, still_alive: Callable[[], bool],
             poll: float = 1.0) -> dict[str, Any] | None:
        """The task's ready result meta, or None when the deadline passed or the
        flight vanished (``still_alive`` turned False with no result)."""
        return self.wait_joined(task_id, deadline, still_alive, poll)[0]

    def wait_joined(self, task_id: str, deadline: float, still_alive: Callable[[], bool],
                    poll: float = 1.0) -> tuple[dict[str, Any] | None, bool]:
        """Like ``wait``, and also whether the result was already there on the
        first read (a flight that finished before this caller arrived)."""
        self._ensure_listener()
        ev = threading.Event()
        with self._lock:
            self._waiters.setdefault(task_id, []).append(ev)
        first = True
        try:
            while True:
                meta = self.get_meta(task_id)
                if meta is not None and meta.get("status") in _READY:
                    return meta, first
                first = False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None, False
                if ev.wait(min(remaining, poll)):
                    ev.clear()
                    continue
                if not still_alive():
                    meta = self.get_meta(task_id)
                    return (meta if meta is not None and meta.get("status") in _READY else None), False
        finally:
            with self._lock:
                evs = self._waiters.get(task_id, [])
                if ev in evs:
                    evs.remove(ev)
                if not evs:
                    self._waiters.pop(task_id, None)

    def close(self) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
