"""The beat's refresh scan: its lock, its budget, and how it sends.

Budget: a scan sends at most what the workers can start before the next
scan, so the refresh queue never holds a backlog that outlives its claims.
Capacity is estimated from the flights they did start since the previous
scan (each resolve and refresh task counts its start: a slot that ran a
resolve could have run a refresh), doubled so the rate can grow, and never
below ``CREDBROKER_WORKER_SLOTS``; the refreshes still queued are subtracted.
Due credentials left over stay due and go out with a later scan.

Each refresh task carries ``expires``, and its per-pair claim lives until
just after that, so the claim cannot lapse while the task is still queued
(the next scan would send the pair again); a task that expired unstarted is
discarded by the worker and its claim lapses with it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from broker.keyspace import key_prefix
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from .constants import PREFIX

__all__ = ["ScanLock", "scan_budget", "refresh_expires_seconds", "count_flight_start", "take_started",
           "REFRESH_STARTED", "SendPlan", "plan_sends"]

log = logging.getLogger(__name__)

# Flight tasks started since the last scan (INCR by each task, GETDEL by the scan).
REFRESH_STARTED = PREFIX + "beat:flights-started"

_EXTEND = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
           "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_FINISH = ("if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
           "if tonumber(ARGV[2]) > 0 then return redis.call('pexpire', KEYS[1], ARGV[2]) end "
           "return redis.call('del', KEYS[1])")


def refresh_expires_seconds(scan_seconds: float) -> float:
    """How long a queued refresh task stays worth running: a few scans (the
    budget keeps the queue shorter than one), at least a minute."""
    return max(60.0, 10 * scan_seconds)


def scan_budget(slots: int, started_since_last: int, queued: int) -> int:
    """Refresh flights this scan may send (see the module docstring)."""
    return max(0, max(slots, 2 * started_since_last) - queued)


def count_flight_start(client: redis.Redis) -> None:
    """Called by each flight task as it starts; feeds the next scan's budget."""
    try:
        client.incr(key_prefix() + REFRESH_STARTED)
    except redis.RedisError:
        pass


def take_started(client: redis.Redis) -> int:
    raw = client.getdel(key_prefix() + REFRESH_STARTED)
    return int(raw) if raw else 0


class ScanLock:
    """One scan per interval cluster-wide, held for as long as the scan runs.

    Taken with a TTL well above a normal scan and extended while it runs; on
    finishing it is kept for the rest of the interval (so a second beat by
    mistake does not scan again in the same interval), then lapses.
    """

    def __init__(self, client: redis.Redis, key: str, interval_seconds: float, hold_seconds: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.key = key
        self.interval = interval_seconds
        self.hold_ms = int(max(hold_seconds, 3 * interval_seconds) * 1000)
        self.token = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._monotonic = monotonic
        self._started = 0.0
        self._extended = 0.0
        self._extend = client.register_script(_EXTEND)
        self._finish = client.register_script(_FINISH)

    def acquire(self) -> bool:
        self._started = self._extended = self._monotonic()
        return bool(self.client.set(self.key, self.token, nx=True, px=self.hold_ms))

    def keep(self) -> bool:
        """Extend the lock if a third of its hold has passed; False if it was lost."""
        now = self._monotonic()
        if now - self._extended < self.hold_ms / 3000.0:
            return True
        self._extended = now
        return bool(self._extend(keys=[self.key], args=[self.token, self.hold_ms]))

    def release(self) -> None:
        left_ms = int((self.interval * 0.9 - (self._monotonic() - self._started)) * 1000)
        self._finish(keys=[self.key], args=[self.token, max(0, left_ms)])


@dataclass(frozen=True)
class SendPlan:
    """What one scan sends: the pairs in order, and why the rest waits."""

    pairs: list[tuple[str, str]]
    skipped_open: int  # of blocked servers
    over_budget: int


def plan_sends(due: Iterable[tuple[str, str]], budget: int, blocked: Callable[[str], bool]) -> SendPlan:
    """The due pairs this scan sends: none of a blocked server (circuit open,
    or at its limit and hung: its calls would be refused), at most ``budget``
    in all, oldest first."""
    pairs: list[tuple[str, str]] = []
    skipped = over = 0
    open_cache: dict[str, bool] = {}
    for user_id, server_key in due:
        if server_key not in open_cache:
            open_cache[server_key] = blocked(server_key)
        if open_cache[server_key]:
            skipped += 1
        elif len(pairs) >= budget:
            over += 1
        else:
            pairs.append((user_id, server_key))
    return SendPlan(pairs, skipped, over)
