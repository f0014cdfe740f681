"""A user's credentials, listed and removed the same way from the API and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import redis

from broker.errors import ServiceUnavailable, StoreDisabled
from broker.models import CredentialStatus, StoredCredential
from broker.servers import ServerConfig

from .constants import cache_key
from .runtime import Runtime

__all__ = ["credential_listing", "remove_credential"]


def credential_listing(server: ServerConfig, stored: StoredCredential | None, now: datetime) -> dict[str, Any]:
    """One row of a user's listing: status and metadata, never a secret.

    A connected credential past its expiry reads ``expired``.
    """
    if stored is None:
        return {"server": server.name, "mode": server.mode.value, "status": CredentialStatus.NOT_CONNECTED.value,
                "expires_at": None, "obtained_via": None, "scopes": [], "last_used_at": None}
    cred = stored.credential
    status = stored.status
    if status in (CredentialStatus.CONNECTED, CredentialStatus.DEGRADED) and cred.is_expired(now):
        status = CredentialStatus.EXPIRED
    return {
        "server": server.name,
        "mode": server.mode.value,
        "status": status.value,
        "expires_at": cred.expires_at.isoformat() if cred.expires_at else None,
        "obtained_via": cred.obtained_via.value,
        "scopes": list(cred.scopes),
        "last_used_at": stored.last_used_at.isoformat() if stored.last_used_at else None,
    }


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
