"""Redis key prefixes and lifetimes, each with the reason for its value."""

from __future__ import annotations

import hashlib

__all__ = [
    "PREFIX", "CACHE_PREFIX", "CACHE_MAX_SECONDS", "FLIGHT_PREFIX", "FLIGHT_HEARTBEAT_MS",
    "TASK_ID_PREFIX", "RESULT_CHANNEL_PREFIX", "AUDIT_STREAM", "AUDIT_GROUP", "AUDIT_STREAM_MAXLEN",
    "PENDING_CONNECT_PREFIX", "USED_ZSET", "BEAT_LOCK", "CLIENT_FLUSH_SECONDS", "pair_id", "cache_key", "flight_key",
]

PREFIX = "credbroker:"

# Sealed copy of a fresh credential for the fast path; lives until the
# credential's refresh point, never longer than this cap.
CACHE_PREFIX = PREFIX + "cache:"
CACHE_MAX_SECONDS = 3600

# The (user, server) flight claim, holding the id of the one task in flight.
FLIGHT_PREFIX = PREFIX + "flight:"
# While a task runs it keeps its claim alive with this TTL, refreshed every
# third of it: a worker killed mid-task frees the pair within this time.
FLIGHT_HEARTBEAT_MS = 6000

# Flight task ids start with this, so a result listener can tell them apart.
TASK_ID_PREFIX = "cbf-"
RESULT_CHANNEL_PREFIX = "celery-task-meta-"

# Audit events go to a stream; workers move them to SQL in batches.
AUDIT_STREAM = PREFIX + "audit"
AUDIT_GROUP = "credbroker-audit"
AUDIT_STREAM_MAXLEN = 1_000_000  # bounded: a stalled consumer must not eat Redis memory

# The live connect URL handed out for a not-connected (user, server), sealed,
# so repeated resolves reuse one state instead of minting one per call.
PENDING_CONNECT_PREFIX = PREFIX + "connect-pending:"

# (user, server_key) -> last use (unix seconds), flushed into SQL by the beat.
USED_ZSET = PREFIX + "used"

# One beat scan per interval, even if two beat processes run by mistake.
BEAT_LOCK = PREFIX + "beat:refresh_due"

# Seconds a client buffers audit events and use marks before one pipelined write.
CLIENT_FLUSH_SECONDS = 0.1


def pair_id(user_id: str, server_key: str) -> str:
    """A fixed-length Redis-safe id of a (user, server) pair."""
    return hashlib.sha256(user_id.encode() + b"\x00" + server_key.encode()).hexdigest()


def cache_key(user_id: str, server_key: str) -> str:
    return CACHE_PREFIX + pair_id(user_id, server_key)


def flight_key(user_id: str, server_key: str) -> str:
    return FLIGHT_PREFIX + pair_id(user_id, server_key)
