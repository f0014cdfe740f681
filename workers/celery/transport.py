"""kombu's Redis transports with our connection classes (``workers.common.deadline``).

Used by every process: senders' publishes obey their caller's deadline, and
workers get one fix for the Sentinel transport: when the master dies, closing
the channel restores unacknowledged messages through a connection the closing
transport has already dropped (kombu 5.7 then fails with ``AttributeError``
and the worker exits with "Unrecoverable error"). The channel keeps its
connection info so the restore goes to the new master instead.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

from workers.common.deadline import DeadlineConnection, DeadlineSentinelConnection

__all__ = ["Transport", "SentinelTransport", "TRANSPORT", "SENTINEL_TRANSPORT"]


class _Channel(kombu_redis.Channel):
    connection_class = DeadlineConnection


class Transport(kombu_redis.Transport):
    Channel = _Channel


class _SentinelChannel(kombu_redis.SentinelChannel):
    connection_class = DeadlineSentinelConnection

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._conninfo = connection.client
        super().__init__(connection, *args, **kwargs)

    def _get_pool(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport.client is not None or self._conninfo is None:
            return super()._get_pool(asynchronous)
        transport.client = self._conninfo  # closing: borrow the info back for the restore
        try:
            return super()._get_pool(asynchronous)
        finally:
            transport.client = None


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = _SentinelChannel


TRANSPORT = __name__ + ":Transport"
SENTINEL_TRANSPORT = __name__ + ":SentinelTransport"
