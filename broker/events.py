"""Connection lifecycle events: a transactional outbox beside the credentials.

Every write that may change a credential's status calls ``announce`` inside
its own transaction, after the write. The row is then locked by that write,
so ``announce`` reads the status it just wrote and the status last announced
(``announced_status``) without a race: when they differ it records the new
announced status and appends one event, in the same transaction. Two workers
writing the same change cannot both emit, a rolled-back write emits nothing,
and a resolve that changes nothing (the common case) costs one primary-key
read. Events never hold a secret: type, user, server, status, reason, time.

``connection.expired`` has no write to ride on (time passes, nothing is
written), so the housekeeping scan announces it: a connect-flow credential,
connected or degraded, past ``expires_at`` with no renewal.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, insert, or_, select, update

from .db import connection_events as E
from .db import credentials as T
from .db import event_cursors as C
from .models import CredentialStatus, ObtainedVia

__all__ = [
    "CONNECTED", "DEGRADED", "RECOVERED", "NEEDS_RECONNECT", "DISCONNECTED", "EXPIRED", "EVENT_TYPES",
    "Event", "transition", "announce", "announce_removed", "announce_expired", "forget_user", "EventLog",
]

CONNECTED = "connection.connected"
DEGRADED = "connection.degraded"
RECOVERED = "connection.recovered"
NEEDS_RECONNECT = "connection.needs_reconnect"
DISCONNECTED = "connection.disconnected"
EXPIRED = "connection.expired"
EVENT_TYPES = (CONNECTED, DEGRADED, RECOVERED, NEEDS_RECONNECT, DISCONNECTED, EXPIRED)

# ``announced_status`` after a connection.expired (the row's status stays as written).
_ANNOUNCED_EXPIRED = CredentialStatus.EXPIRED.value
_DISCONNECTED_STATUS = CredentialStatus.NOT_CONNECTED.value
_LIVE = (CredentialStatus.CONNECTED.value, CredentialStatus.DEGRADED.value)
# The expiry scan's cursor (unix ms of the last expires_at it covered).
_EXPIRY_CURSOR = "expiry-scan"


@dataclass(frozen=True)
class Event:
    """One lifecycle event as the API and webhooks show it (server is a name)."""

    id: int
    type: str
    user_id: str
    server: str
    status: str
    reason: str | None
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "user_id": self.user_id, "server": self.server,
                "status": self.status, "reason": self.reason, "at": self.at.isoformat()}


def transition(announced: str | None, status: str) -> str | None:
    """The event for a row whose status moved from ``announced`` to ``status``
    (None: nothing to announce). Pure, so the table is tested on its own."""
    if announced == status:
        return None
    if status == CredentialStatus.CONNECTED.value:
        if announced in (CredentialStatus.DEGRADED.value, _ANNOUNCED_EXPIRED):
            return RECOVERED  # healed without the user: a renewal worked again
        return CONNECTED  # first credential, or the user reconnected
    if status == CredentialStatus.DEGRADED.value:
        return DEGRADED
    if status == CredentialStatus.NEEDS_RECONNECT.value:
        return NEEDS_RECONNECT
    return None


def _pk(user_id: str, server_key: str) -> Any:
    return and_(T.c.user_id == user_id, T.c.server_key == server_key)


# Built once: these run inside every status-changing write, so their Python
# construction cost counts on the miss path.
_KEY = and_(T.c.user_id == bindparam("u"), T.c.server_key == bindparam("k"))
_READ = select(T.c.status, T.c.announced_status, T.c.failure).where(_KEY)
_MARK = update(T).where(_KEY).values(announced_status=bindparam("s"))
_APPEND = insert(E)


def announce(conn: Connection, user_id: str, server_key: str, now: datetime, *,
             created: str | None = None) -> str | None:
    """Call inside the transaction that just wrote the row (it holds the row's
    lock): append the event its status change calls for, once. ``created``:
    the status of a row this transaction inserted (nothing announced yet, and
    no read needed). Returns the event type."""
    if created is not None:
        status, announced, failure = created, None, None
    else:
        row = conn.execute(_READ, {"u": user_id, "k": server_key}).first()
        if row is None:
            return None
        status, announced, failure = row.status, row.announced_status, row.failure
    kind = transition(announced, status)
    if kind is None:
        return None
    conn.execute(_MARK, {"u": user_id, "k": server_key, "s": status})
    reason = failure if kind in (DEGRADED, NEEDS_RECONNECT) else None
    conn.execute(_APPEND, {"type": kind, "user_id": user_id, "server_key": server_key, "status": status,
                           "reason": reason, "at": now})
    return kind


def announce_removed(conn: Connection, deleted: int, user_id: str, server_key: str, now: datetime,
                     reason: str = "deleted") -> None:
    """Call inside the transaction that deleted the row (``deleted``: its rowcount)."""
    if deleted:
        conn.execute(insert(E).values(type=DISCONNECTED, user_id=user_id, server_key=server_key,
                                      status=_DISCONNECTED_STATUS, reason=reason, at=now))


def announce_expired(engine: Engine, now: datetime, *, first_scan_lookback: timedelta = timedelta(days=1),
                     limit: int = 1000) -> int:
    """Announce connect-flow credentials that expired since the last scan.

    The scan covers ``expires_at`` from its cursor to ``now`` (an indexed
    range), so its cost follows the number newly expired, not the number
    stored. Each row is announced by a conditional UPDATE, so a concurrent
    renewal (which moves ``expires_at``) or a second scanner cannot make it
    announce twice.
    """
    with engine.begin() as conn:
        position = conn.execute(select(C.c.position).where(C.c.name == _EXPIRY_CURSOR).with_for_update()).scalar()
        since = (now - first_scan_lookback) if position is None else _from_ms(position)
        rows = conn.execute(
            select(T.c.user_id, T.c.server_key, T.c.expires_at)
            .where(and_(T.c.expires_at > since, T.c.expires_at <= now, T.c.status.in_(_LIVE),
                        T.c.obtained_via == ObtainedVia.CONNECT_FLOW.value,
                        or_(T.c.announced_status.is_(None), T.c.announced_status != _ANNOUNCED_EXPIRED)))
            .order_by(T.c.expires_at).limit(limit)
        ).all()
        emitted = 0
        for row in rows:
            done = conn.execute(
                update(T).where(and_(_pk(row.user_id, row.server_key), T.c.expires_at <= now,
                                     T.c.status.in_(_LIVE),
                                     or_(T.c.announced_status.is_(None), T.c.announced_status != _ANNOUNCED_EXPIRED)))
                .values(announced_status=_ANNOUNCED_EXPIRED)
            ).rowcount
            if done:
                conn.execute(insert(E).values(type=EXPIRED, user_id=row.user_id, server_key=row.server_key,
                                              status=_ANNOUNCED_EXPIRED, reason="expires_at_passed", at=now))
                emitted += 1
        # A full batch: resume after its last row next time; else the scan reached now.
        reached = rows[-1].expires_at if len(rows) == limit else now
        _set_cursor(conn, _EXPIRY_CURSOR, _to_ms(reached), position is None)
    return emitted


def forget_user(engine: Engine, user_id: str, pseudonym: str) -> int:
    """Erasure: the user's past events keep their place under ``pseudonym``.
    Run after the user's credentials were deleted (their disconnects included)."""
    with engine.begin() as conn:
        return int(conn.execute(update(E).where(E.c.user_id == user_id).values(user_id=pseudonym)).rowcount)


def _to_ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    from datetime import UTC

    return datetime.fromtimestamp(ms / 1000, UTC)


def _set_cursor(conn: Connection, name: str, position: int, new: bool) -> None:
    if new:
        conn.execute(insert(C).values(name=name, position=position))
    else:
        conn.execute(update(C).where(C.c.name == name).values(position=position))


class EventLog:
    """Reads the outbox oldest first and keeps consumers' cursors."""

    def __init__(self, engine: Engine, server_name: Any = None) -> None:
        self.engine = engine
        # server_key -> name (a removed server's events show its key).
        self._name = server_name or (lambda key: None)

    def after(self, cursor: int, limit: int = 100, user_id: str | None = None) -> builtins.list[Event]:
        stmt = select(E).where(E.c.id > cursor)
        if user_id is not None:
            stmt = stmt.where(E.c.user_id == user_id)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(E.c.id).limit(limit)).all()
        return [self._event(r) for r in rows]

    def get(self, event_id: int) -> Event | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(E).where(E.c.id == event_id)).first()
        return None if row is None else self._event(row)

    def last_id(self) -> int:
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(E.c.id), 0))).scalar_one())

    def _event(self, row: Any) -> Event:
        return Event(int(row.id), row.type, row.user_id, self._name(row.server_key) or row.server_key, row.status,
                     row.reason, row.at)

    def claim_batch(self, name: str, limit: int, send: Any) -> int:
        """Hand the events after consumer ``name``'s cursor to ``send`` (in
        order) and move the cursor past them, under the cursor row's lock, so
        two dispatchers never hand out the same batch. ``send`` raising keeps
        the cursor where it was (at-least-once: receivers dedupe by event id)."""
        with self.engine.begin() as conn:
            position = conn.execute(select(C.c.position).where(C.c.name == name).with_for_update()).scalar()
            start = 0 if position is None else int(position)
            rows = conn.execute(select(E).where(E.c.id > start).order_by(E.c.id).limit(limit)).all()
            if not rows:
                if position is None:
                    _set_cursor(conn, name, 0, True)
                return 0
            for row in rows:
                send(self._event(row))
            _set_cursor(conn, name, int(rows[-1].id), position is None)
        return len(rows)
