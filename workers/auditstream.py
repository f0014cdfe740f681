"""Audit off the request path: a buffered Redis stream writer and its SQL mover.

Callers append events to an in-process buffer; a background thread writes them
to a Redis stream in one pipeline every ``CLIENT_FLUSH_SECONDS``, together
with "used" marks that tell the beat which credentials are in use. Workers
move the stream to SQL in batches through a consumer group, so an event is
deleted from Redis only after it is in SQL.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from collections.abc import Iterable
from typing import Any

import redis

from broker.audit import Action, AuditEvent, SqlAuditLog

from .constants import AUDIT_GROUP, AUDIT_STREAM, AUDIT_STREAM_MAXLEN, CLIENT_FLUSH_SECONDS, USED_ZSET

__all__ = ["StreamAuditSink", "persist_audit_batch", "pop_used", "restore_used"]

log = logging.getLogger(__name__)
_BUFFER_LIMIT = 100_000  # events kept while Redis is down; beyond that the oldest are dropped, counted


class StreamAuditSink:
    """An AuditSink that never blocks the request path."""

    def __init__(self, client: redis.Redis, flush_seconds: float = CLIENT_FLUSH_SECONDS) -> None:
        self.client = client
        self.flush_seconds = flush_seconds
        self._events: list[AuditEvent] = []
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def record(self, events: Iterable[AuditEvent]) -> None:
        with self._lock:
            self._events.extend(events)
            overflow = len(self._events) - _BUFFER_LIMIT
            if overflow > 0:
                del self._events[:overflow]
                self.dropped += overflow
        self._ensure_thread()

    def mark_used(self, user_id: str, server_key: str, when: float | None = None) -> None:
        with self._lock:
            self._used[json.dumps([user_id, server_key])] = when or time.time()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="credbroker-audit", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._stopped.wait(self.flush_seconds)
            try:
                self.flush()
            except (redis.RedisError, OSError, ValueError):
                log.warning("audit stream: Redis unavailable; %d events buffered", len(self._events))

    def flush(self) -> int:
        """Write buffered events and use marks; on failure they stay buffered."""
        with self._lock:
            events, self._events = self._events, []
            used, self._used = self._used, {}
        if not events and not used:
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for e in events:
                pipe.xadd(AUDIT_STREAM, {"e": json.dumps(e.to_dict())}, maxlen=AUDIT_STREAM_MAXLEN,
                          approximate=True)
            if used:
                pipe.zadd(USED_ZSET, used, gt=True)
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._events[:0] = events
                for k, v in used.items():
                    self._used.setdefault(k, v)
            raise
        return len(events)

    def close(self) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
        try:
            self.flush()
        except redis.RedisError:
            log.warning("audit stream: %d events could not be written at close", len(self._events))


def _ensure_group(client: redis.Redis) -> None:
    try:
        client.xgroup_create(AUDIT_STREAM, AUDIT_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def persist_audit_batch(client: redis.Redis, sql: SqlAuditLog, consumer: str, count: int = 1000) -> int:
    """Move up to ``count`` events from the stream into SQL; returns how many.

    Entries a crashed consumer left pending for over a minute are claimed too.
    """
    _ensure_group(client)
    entries: list[tuple[Any, dict[Any, Any]]] = []
    claimed = client.xautoclaim(AUDIT_STREAM, AUDIT_GROUP, consumer, min_idle_time=60_000, count=count)
    if claimed and len(claimed) > 1:
        entries.extend(claimed[1])
    if len(entries) < count:
        for _stream, items in client.xreadgroup(AUDIT_GROUP, consumer, {AUDIT_STREAM: ">"},
                                                count=count - len(entries)) or []:
            entries.extend(items)
    if not entries:
        return 0
    events = []
    for _id, fields in entries:
        raw = fields.get(b"e") or fields.get("e")
        try:
            events.append(AuditEvent.from_dict(json.loads(raw)))
        except (TypeError, ValueError):
            log.warning("audit stream: dropped a malformed entry")
    erased = [e for e in events if e.action is Action.ERASE and e.user_id and (e.reason or "").startswith("erased:")]
    if erased:
        # An erase event carries the user's id only until here: its row gets the
        # pseudonym, and so do every earlier row of the user (the stream is in
        # order, so those are already in SQL or in this batch).
        by_user = {e.user_id: str(e.reason) for e in erased}
        events = [replace(e, user_id=by_user[e.user_id]) if e.user_id in by_user else e for e in events]
    sql.record(events)
    for user_id, pseudonym in (by_user.items() if erased else ()):
        sql.pseudonymise(str(user_id), pseudonym)
    ids = [i for i, _ in entries]
    client.xack(AUDIT_STREAM, AUDIT_GROUP, *ids)
    client.xdel(AUDIT_STREAM, *ids)
    return len(events)


def pop_used(client: redis.Redis, count: int = 10_000) -> list[tuple[str, str, float]]:
    """Take the oldest use marks: (user_id, server_key, unix time)."""
    out = []
    for member, score in client.zpopmin(USED_ZSET, count):
        try:
            user_id, server_key = json.loads(member)
        except (TypeError, ValueError):
            continue
        out.append((user_id, server_key, float(score)))
    return out


def restore_used(client: redis.Redis, uses: list[tuple[str, str, float]]) -> None:
    """Put use marks back (a failed database write must not lose them); a newer
    mark made meanwhile wins."""
    if uses:
        client.zadd(USED_ZSET, {json.dumps([u, k]): t for u, k, t in uses}, gt=True)
