"""Removing a user's credential, the same way from the API and the CLI."""

from __future__ import annotations

import redis

from broker.errors import ServiceUnavailable, StoreDisabled

from .constants import cache_key
from .runtime import Runtime

__all__ = ["remove_credential"]


def remove_credential(rt: Runtime, user_id: str, server_name: str, request_id: str | None = None) -> bool:
    """Revoke upstream (RFC 7009, where configured), delete, and clear the cache.

    The cache goes first: if Redis is down nothing is deleted, so the fast path
    can never keep serving a credential the store no longer has. It goes again
    afterwards, in case a flight that finished in between re-cached it.
    """
    server = rt.servers.get_server(server_name)
    if rt.connect is None:
        raise StoreDisabled()
    key = cache_key(user_id, server.key)
    try:
        rt.redis.delete(key)
        deleted = rt.connect.disconnect(user_id, server.name, request_id)
        rt.redis.delete(key)
    except redis.RedisError:
        raise ServiceUnavailable("Redis unavailable: nothing was removed; retry") from None
    return deleted
