"""The Redis result backend, minus per-thread result subscriptions.

Celery's Redis backend subscribes the sending thread to every task it sends;
callers here wait through one shared listener (``flight.ResultWaiter``)
instead, so sending from many threads stays safe and cheap.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

__all__ = ["FlightResultBackend", "FlightSentinelBackend"]


class FlightResultBackend(RedisBackend):
    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class FlightSentinelBackend(SentinelBackend):
    """The same, with the master found through Redis Sentinel."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None
