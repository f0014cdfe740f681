"""The beat's scans: which credentials to renew now, read through indexes.

Two indexed range scans, each costing what is due, not what is stored:
``due`` (refresh point passed, used recently, not backing off) takes a fair
share per server on ``(server_key, refresh_at)``; ``keepalive_due`` finds
idle refresh tokens to exercise on ``keepalive_at``. A failed renewal moves
both columns to its next attempt (``CredentialStore.record_failure``), so a
credential in backoff is not read again until then.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, or_, select

from .db import credentials as T
from .models import CredentialStatus

__all__ = ["due_statement", "due", "keepalive_statement", "keepalive_due"]

# Statuses the beat renews; needs_reconnect waits for the user.
_RENEWABLE = (CredentialStatus.CONNECTED.value, CredentialStatus.DEGRADED.value)


def due_statement(now: datetime, used_since: datetime, limit: int = 1000, server_key: str | None = None,
                  offset: int = 0) -> Any:
    """The due scan's SELECT, for one server when ``server_key`` is given."""
    cond = [T.c.refresh_at <= now, T.c.refresh_at >= used_since, T.c.last_used_at >= used_since,
            T.c.status.in_(_RENEWABLE), or_(T.c.next_attempt_at.is_(None), T.c.next_attempt_at <= now)]
    if server_key is not None:
        cond.insert(0, T.c.server_key == server_key)
    stmt = select(T.c.user_id, T.c.server_key).where(and_(*cond)).order_by(T.c.refresh_at).limit(limit)
    return stmt.offset(offset) if offset else stmt


def due(engine: Engine, now: datetime, used_since: datetime, limit: int = 1000,
        server_keys: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(user_id, server_key) pairs whose refresh point has passed, that were
    used recently and are not backing off.

    With ``server_keys``, each server gets a fair share of ``limit`` (one
    bounded query per server; what quiet servers leave goes to busy ones),
    interleaved, so thousands of due credentials of a failing server never
    hide a healthy server's. The range starts at ``used_since`` too: an idle
    credential's refresh point stays in the past forever, and without a lower
    bound every one of them would be read on every scan. A credential in use
    cannot sit past its refresh point for long (a caller's flight renews it).
    """
    with engine.connect() as conn:
        if server_keys is None:
            return [(r.user_id, r.server_key) for r in conn.execute(due_statement(now, used_since, limit))]
        keys = list(dict.fromkeys(server_keys))
        if not keys or limit <= 0:
            return []
        share = max(1, limit // len(keys))
        picked: dict[str, list[tuple[str, str]]] = {}
        for key in keys:
            rows = conn.execute(due_statement(now, used_since, share, server_key=key)).all()
            picked[key] = [(r.user_id, r.server_key) for r in rows]
        left = limit - sum(len(v) for v in picked.values())
        hungry = [k for k in keys if len(picked[k]) == share]
        if left > 0 and hungry:
            extra = max(1, left // len(hungry))
            for key in hungry:
                rows = conn.execute(due_statement(now, used_since, extra, server_key=key, offset=share)).all()
                picked[key].extend((r.user_id, r.server_key) for r in rows)
    return _interleave([picked[k] for k in keys])[:limit]


def keepalive_statement(now: datetime, limit: int = 1000) -> Any:
    """The keep-alive scan's SELECT (see ``keepalive_due``)."""
    return (
        select(T.c.user_id, T.c.server_key)
        .where(and_(T.c.keepalive_at <= now, T.c.status.in_(_RENEWABLE),
                    or_(T.c.next_attempt_at.is_(None), T.c.next_attempt_at <= now)))
        .order_by(T.c.keepalive_at)
        .limit(limit)
    )


def keepalive_due(engine: Engine, now: datetime, limit: int = 1000) -> list[tuple[str, str]]:
    """Pairs whose refresh token must be exercised now, used or not: every
    successful renewal moves ``keepalive_at`` forward, a failure moves it to
    the next attempt and ``needs_reconnect`` clears it, so only the due are read."""
    with engine.connect() as conn:
        return [(r.user_id, r.server_key) for r in conn.execute(keepalive_statement(now, limit))]


def _interleave(lists: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Round-robin over the servers' lists, so no server's flights all go first."""
    out: list[tuple[str, str]] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out
