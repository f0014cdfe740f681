"""Redis connections from ``CREDBROKER_REDIS_URL``: a plain server or Sentinel.

Plain: ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``).
Sentinel: one ``sentinel://`` address per sentinel, joined by ``;``, the
database in the path and the master's name in the query, as Celery and kombu
spell it::

    sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2:26379;sentinel://:pw@10.0.0.3:26379/0?master_name=mymaster

The password is the master's; ``sentinel_password`` in the query is the
sentinels' own, if they have one. Every connection has connect, socket and
keepalive timeouts, and obeys the caller's deadline (``workers.common.deadline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from broker.errors import ConfigError
from broker.settings import Settings

from .deadline import DeadlineConnection, DeadlinePool, DeadlineSentinelConnection

__all__ = ["RedisTarget", "parse_redis_url", "redis_client", "async_redis_client", "sentinel_kwargs", "SOCKET_TIMEOUT", "CONNECT_TIMEOUT",
           "SENTINEL_TIMEOUT", "HEALTH_CHECK_SECONDS"]

# A Redis command here takes milliseconds; 5 s without a byte means the server
# is gone (threads with a deadline get less: whatever their caller has left).
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0
# Asking a sentinel where the master is: one slow sentinel must not eat a
# caller's deadline, the next one is asked instead.
SENTINEL_TIMEOUT = 0.5
# An idle pooled connection is pinged before reuse after this long, and TCP
# keepalive notices a peer that vanished (a failed-over VM) on idle sockets.
HEALTH_CHECK_SECONDS = 15
# A stale pooled socket (Redis restarted) is retried at once on a fresh one, a
# few times; no back-off sleeps, which would run past a caller's deadline.
_RETRY = Retry(NoBackoff(), 2)


def sentinel_kwargs(password: str | None) -> dict[str, Any]:
    """How each sentinel is asked: short timeouts and no retries of its own
    (redis-py's default backs off for seconds; the next sentinel is asked instead)."""
    return {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT,
            "retry": Retry(NoBackoff(), 0), "password": password}


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is: a URL for redis-py, or sentinels and a master name."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def celery_url(self) -> str:
        """The URL for Celery and kombu: the query (ours) dropped."""
        return self.url.split("?", 1)[0] if self.is_sentinel else self.url


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a plain or Sentinel URL; raises ConfigError naming the variable."""
    if not url.startswith("sentinel://"):
        return RedisTarget(url)
    base, _, query = url.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    hosts: list[tuple[str, int]] = []
    db = 0
    username = password = None
    for part in base.split(";"):
        try:
            parts = urlsplit(part)
            port = parts.port or 26379
        except ValueError:
            raise ConfigError("CREDBROKER_REDIS_URL: not a valid sentinel URL") from None
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ConfigError("CREDBROKER_REDIS_URL: every address must be sentinel://host:port")
        hosts.append((parts.hostname, port))
        if parts.password and password is None:
            username, password = (unquote(parts.username) if parts.username else None), unquote(parts.password)
        if parts.path.strip("/"):
            try:
                db = int(parts.path.strip("/"))
            except ValueError:
                raise ConfigError("CREDBROKER_REDIS_URL: the database must be a number") from None
    master = params.get("master_name", "")
    if not master:
        raise ConfigError("CREDBROKER_REDIS_URL: a sentinel URL needs ?master_name=NAME")
    return RedisTarget(url, tuple(hosts), master, db, username, password, params.get("sentinel_password"))


def _sentinel(target: RedisTarget) -> Sentinel:
    return Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs(target.sentinel_password))


def _common(socket_timeout: float, connect_timeout: float, retry: Any) -> dict[str, Any]:
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout, "socket_keepalive": True,
            "health_check_interval": HEALTH_CHECK_SECONDS, "retry": retry}


def async_redis_client(settings: Settings, *, max_connections: int = 128,
                       socket_timeout: float = SOCKET_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT) -> Any:
    """A ``redis.asyncio`` client for the same target. Coroutines queue for one
    of ``max_connections`` connections; the caller's deadline is the awaiting
    task's own timeout (``asyncio.timeout``), which cancels a stalled call."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    target = parse_redis_url(settings.redis_url)
    common = _common(socket_timeout, connect_timeout, AsyncRetry(NoBackoff(), 2))
    if target.is_sentinel:
        sentinel = AsyncSentinel(list(target.sentinels), sentinel_kwargs={
            **sentinel_kwargs(target.sentinel_password), "retry": AsyncRetry(NoBackoff(), 0)})
        return sentinel.master_for(target.master_name, db=target.db, username=target.username,
                                   password=target.password, **common)
    if target.url.startswith("unix://"):
        common.pop("socket_keepalive")
    pool = aredis.BlockingConnectionPool.from_url(target.url, max_connections=max_connections, timeout=None,
                                                  **common)
    return aredis.Redis.from_pool(pool)


def redis_client(settings: Settings, *, max_connections: int = 1024, pool_timeout: float = 10.0,
                 socket_timeout: float = SOCKET_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT) -> redis.Redis:
    """A pooled client: callers queue for a connection (up to ``pool_timeout``,
    or their deadline) instead of failing at once when the pool is busy."""
    target = parse_redis_url(settings.redis_url)
    common = _common(socket_timeout, connect_timeout, _RETRY)
    if target.is_sentinel:
        return _sentinel(target).master_for(
            target.master_name, connection_class=DeadlineSentinelConnection, db=target.db,
            username=target.username, password=target.password, **common)
    if target.url.startswith("redis://"):  # TLS and unix sockets keep redis-py's classes
        common["connection_class"] = DeadlineConnection
    elif target.url.startswith("unix://"):  # no TCP: no keepalive, and connecting cannot hang
        common.pop("socket_keepalive")
    pool = DeadlinePool.from_url(target.url, max_connections=max_connections, timeout=pool_timeout, **common)
    return redis.Redis.from_pool(pool)
