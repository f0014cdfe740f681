"""kombu's Redis transports with our connection classes (``workers.common.deadline``).

Used by every process: senders' publishes obey their caller's deadline, and
workers get one fix for both transports: when Redis goes away (a restart, a
Sentinel master's death), closing the channel restores unacknowledged messages
through a connection the closing transport has already dropped (kombu 5.7
then fails with ``AttributeError: 'NoneType' object has no attribute
'hostname'`` and the worker exits with "Unrecoverable error": a plain Redis
restart killed every worker in the chaos test). The channel keeps its
connection info so the restore goes to the Redis that answers again instead.

Publishing reuses one redis-py client per channel and pool: kombu builds a new
``redis.Redis`` for every publish, which with redis-py 8 costs about as much
CPU as the round trip itself (~90 us here; 10% of a worker's samples while
delivering webhooks). A client is safe to share across threads; a new pool
(after a disconnect) gets a new client.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

from workers.common.deadline import DeadlineConnection, DeadlineSentinelConnection

__all__ = ["Transport", "SentinelTransport", "TRANSPORT", "SENTINEL_TRANSPORT"]


class _KeepsConnInfo(kombu_redis.Channel):
    """Remembers the connection info, for the restore that runs while closing."""

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._conninfo = connection.client
        super().__init__(connection, *args, **kwargs)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_sync_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, super()._create_client())
            self.__dict__["_sync_client"] = cached
        return cached[1]

    def _get_pool(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport.client is not None or self._conninfo is None:
            return super()._get_pool(asynchronous)
        transport.client = self._conninfo  # closing: borrow the info back for the restore
        try:
            return super()._get_pool(asynchronous)
        finally:
            transport.client = None


class _Channel(_KeepsConnInfo):
    connection_class = DeadlineConnection


class Transport(kombu_redis.Transport):
    Channel = _Channel


class _SentinelChannel(_KeepsConnInfo, kombu_redis.SentinelChannel):
    connection_class = DeadlineSentinelConnection


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = _SentinelChannel


TRANSPORT = __name__ + ":Transport"
SENTINEL_TRANSPORT = __name__ + ":SentinelTransport"
