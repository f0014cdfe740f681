"""Erasing a user: the same from the API (``DELETE /v1/users/{id}``) and the CLI.

Revokes upstream where configured, deletes every credential (also of servers
no longer configured), the subject token, pending connect links and states,
cached copies and use marks. Past audit events keep their place in the trail
under a keyed pseudonym (``erased:...``): the audit mover swaps the id when it
writes the ``erase`` event, so no row keeps the user's id.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import redis

from broker.audit import Action, Outcome, record_event
from broker.errors import ServiceUnavailable, StoreDisabled
from broker.events import forget_user

from workers.common.constants import cache_key, pending_connect_key, used_zset
from workers.common.runtime import Runtime
from .credentials import remove_credential

__all__ = ["erase_user", "pseudonym", "delete_subject_token"]

_PSEUDONYM_LABEL = "credbroker audit pseudonym v1"


def pseudonym(rt: Runtime, user_id: str) -> str:
    """A stable stand-in for an erased user id; only a key holder can link it back."""
    keyring = rt.settings.keyring
    key = keyring.derive(_PSEUDONYM_LABEL) if keyring is not None else b""
    return "erased:" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]


def delete_subject_token(rt: Runtime, user_id: str, request_id: str | None = None) -> bool:
    """Forget the user's IdP token: no more minting until the gateway stores a new one."""
    if not rt.store.enabled:
        raise StoreDisabled()
    deleted = rt.store.delete_subject_token(user_id)
    record_event(rt.audit, rt.clock.now(), Action.SUBJECT_TOKEN, Outcome.SUCCESS, user_id=user_id, server=None,
                 method="subject_token", reason="deleted" if deleted else "none_stored", request_id=request_id)
    return deleted


def erase_user(rt: Runtime, user_id: str, request_id: str | None = None) -> int:
    """Remove everything the broker holds for the user; returns the credentials removed."""
    if rt.connect is None or not rt.store.enabled:
        raise StoreDisabled()
    removed = 0
    configured = {rt.servers[name].key: name for name in rt.servers}
    for stored in rt.store.list(user_id):
        name = configured.get(stored.server_key)
        if name is not None:
            removed += int(remove_credential(rt, user_id, name, request_id))  # revokes upstream first
        else:  # a server removed from the config: no endpoint left to revoke at
            removed += int(rt.store.delete(user_id, stored.server_key))
    removed += rt.store.delete_user(user_id)  # rows no key here can read (nothing to revoke with)
    rt.store.delete_subject_token(user_id)
    keys = set(configured)
    rt.audit.discard_used(user_id)  # this process's buffered marks; the zrem below takes the flushed ones
    try:
        rt.connect.discard_pending(user_id)
        rt.audit.flush()  # use marks still buffered here must not land after the ZREM below
        pipe = rt.redis.pipeline(transaction=False)
        for key in keys:
            pipe.delete(cache_key(user_id, key), pending_connect_key(user_id, key))
            pipe.zrem(used_zset(), json.dumps([user_id, key]))
        pipe.execute()
    except redis.RedisError:
        raise ServiceUnavailable("Redis unavailable: the user's pending links were not cleared; retry") from None
    # Past connection events keep their place under the pseudonym, like the audit trail.
    forget_user(rt.store.engine, user_id, pseudonym(rt, user_id))
    record_event(rt.audit, rt.clock.now(), Action.ERASE, Outcome.SUCCESS, user_id=user_id, server=None,
                 method="none", reason=pseudonym(rt, user_id), request_id=request_id)
    return removed
