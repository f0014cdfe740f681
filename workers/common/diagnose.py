"""Turning a bare failure into one that says what to do, with one cheap look at Redis.

Called only on the failure path (a resolve that timed out), so the extra
Redis round trip costs nothing on the paths that work.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from broker.errors import ResolveTimeout

__all__ = ["explain_timeout", "explain_waiting"]

log = logging.getLogger(__name__)


def explain_timeout(client: Any, queue: str) -> ResolveTimeout:
    """A ResolveTimeout naming the likely cause when tasks sit untaken in the queue.

    A task a worker has taken leaves the queue list at once (late acks keep it
    in the unacked set instead), so a non-empty queue after a whole timeout
    means no worker consumed it: none runs, or all are busy.
    """
    try:
        waiting = int(client.llen(queue))
    except (redis.RedisError, OSError, TypeError, ValueError):
        return ResolveTimeout()
    return explain_waiting(waiting, queue)


def explain_waiting(waiting: int, queue: str) -> ResolveTimeout:
    """The timeout for ``waiting`` tasks left in ``queue`` (the async client reads the count itself)."""
    if waiting <= 0:
        return ResolveTimeout()
    log.warning("resolve timed out with %d task(s) waiting in queue %s", waiting, queue)
    return ResolveTimeout(
        f"resolve timed out: {waiting} task(s) wait in the queue and no worker took them; is a worker "
        "running? Start one with `credbroker worker` (or run everything with `credbroker up`)"
    )
