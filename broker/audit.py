"""The secret-free audit trail: events, SQL persistence and queries.

An event has no field able to hold a credential: every field is an enum, a
validated id, or a short lower-case reason code.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import Engine, and_, delete, insert, select, update

from .clock import utcnow
from .db import audit_events as A
from .errors import ServiceUnavailable

__all__ = ["Action", "Outcome", "AuditEvent", "AuditSink", "SqlAuditLog", "MemoryAuditSink", "reason_code",
           "record_event", "AUDIT_MAX_LIMIT", "prune_expired"]

log = logging.getLogger(__name__)

# The most events one query returns, over HTTP (`limit`) and in the CLI (`--limit`) alike.
AUDIT_MAX_LIMIT = 1000

_REASON_RE = re.compile(r"^[a-z0-9_.:]{1,64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_METHODS = frozenset({"token_exchange", "entra_obo", "identity_assertion", "connect", "connect_flow", "cache", "subject_token", "none"})


class Action(StrEnum):
    INJECT = "inject"  # served from a valid cached credential
    ACQUIRE = "acquire"
    REFRESH = "refresh"
    CONNECT = "connect"
    REVOKE = "revoke"
    DISCONNECT = "disconnect"
    SUBJECT_TOKEN = "subject_token"
    ERASE = "erase"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"
    STALE = "stale"  # renewal failed, still-valid credential served


def reason_code(value: str | None) -> str | None:
    """A coarse reason, or None: anything that is not a short code is dropped."""
    if value is None:
        return None
    value = value.lower()
    return value if _REASON_RE.match(value) else "other"


@dataclass(frozen=True)
class AuditEvent:
    """One audited step. Construction enforces that no field can carry a secret."""

    action: Action
    outcome: Outcome
    user_id: str | None = None
    server: str | None = None
    method: str | None = None
    reason: str | None = None
    request_id: str | None = None
    ts: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "outcome", Outcome(self.outcome))
        object.__setattr__(self, "reason", reason_code(self.reason))
        if self.method is not None and self.method not in _METHODS:
            object.__setattr__(self, "method", "none")
        if self.request_id is not None and not _ID_RE.match(self.request_id):
            object.__setattr__(self, "request_id", None)
        if self.user_id is not None and (len(self.user_id) > 256 or not self.user_id.isprintable()):
            raise ValueError("audit user_id is not a valid user id")
        if self.server is not None and (len(self.server) > 128 or not self.server.isprintable()):
            raise ValueError("audit server is not a valid server name")

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: every field is immutable, and asdict's deep copy
        # cost more than the rest of a fast-path resolve.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["action"] = self.action.value
        d["outcome"] = self.outcome.value
        d["ts"] = self.ts.isoformat()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditEvent:
        data = dict(d)
        data.pop("id", None)
        if isinstance(data.get("ts"), str):
            data["ts"] = datetime.fromisoformat(data["ts"])
        return cls(**data)


class AuditSink(Protocol):
    def record(self, events: Iterable[AuditEvent]) -> None: ...


def record_event(sink: AuditSink, ts: datetime, action: Action, outcome: Outcome, *, user_id: str | None,
                 server: str | None, method: str | None, reason: str | None = None,
                 request_id: str | None = None) -> None:
    """Record one event; an audit outage is logged and never fails the audited call."""
    try:
        sink.record([AuditEvent(action=action, outcome=outcome, user_id=user_id, server=server, method=method,
                                reason=reason, request_id=request_id, ts=ts)])
    except Exception as exc:  # noqa: BLE001
        log.warning("audit record failed: %s", type(exc).__name__)


class MemoryAuditSink:
    """Keeps events in a list; for unit tests of the resolver."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, events: Iterable[AuditEvent]) -> None:
        self.events.extend(events)


class SqlAuditLog:
    """Audit events in SQL, queried newest first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, events: Iterable[AuditEvent]) -> None:
        rows = [
            {f.name: getattr(e, f.name) for f in fields(e)} | {"action": e.action.value, "outcome": e.outcome.value}
            for e in events
        ]
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(A), rows)
        except Exception as exc:  # noqa: BLE001 - driver errors may quote values
            log.warning("audit write failed: %s", type(exc).__name__)
            raise ServiceUnavailable("database unavailable") from None

    def pseudonymise(self, user_id: str, pseudonym: str) -> int:
        """Replace a user's id in every past event (erasure keeps the trail, not the person)."""
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(update(A).where(A.c.user_id == user_id).values(user_id=pseudonym)).rowcount)
        except Exception as exc:  # noqa: BLE001
            log.warning("audit pseudonymise failed: %s", type(exc).__name__)
            raise ServiceUnavailable("database unavailable") from None

    def prune(self, before: datetime, batch_size: int = 5000) -> int:
        """Delete up to ``batch_size`` of the oldest events older than ``before``.

        One short transaction per batch, so retention never holds a long lock;
        the caller repeats while a full batch was deleted.
        """
        ids = select(A.c.id).where(A.c.ts < before).order_by(A.c.id).limit(batch_size).scalar_subquery()
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(delete(A).where(A.c.id.in_(ids))).rowcount)
        except Exception as exc:  # noqa: BLE001
            log.warning("audit prune failed: %s", type(exc).__name__)
            raise ServiceUnavailable("database unavailable") from None

    def query(
        self,
        *,
        user_id: str | None = None,
        server: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Events newest first (or, with ``after_id``, oldest first after it, for --follow)."""
        cond = []
        if user_id is not None:
            cond.append(A.c.user_id == user_id)
        if server is not None:
            cond.append(A.c.server == server)
        if since is not None:
            cond.append(A.c.ts >= since)
        if until is not None:
            cond.append(A.c.ts < until)
        if after_id is not None:
            cond.append(A.c.id > after_id)
        stmt = select(A).where(and_(*cond)) if cond else select(A)
        order = (A.c.id.asc(),) if after_id is not None else (A.c.ts.desc(), A.c.id.desc())
        stmt = stmt.order_by(*order).limit(max(1, min(limit, AUDIT_MAX_LIMIT)))
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
        except Exception as exc:  # noqa: BLE001
            log.warning("audit query failed: %s", type(exc).__name__)
            raise ServiceUnavailable("database unavailable") from None
        out = []
        for r in rows:
            d = dict(r._mapping)
            d["ts"] = d["ts"].isoformat()
            out.append(d)
        return out


def prune_expired(sql: SqlAuditLog, now: datetime, retention_days: int, batch_size: int = 5000,
                  max_batches: int = 20) -> int:
    """Delete events older than the retention, a batch per transaction; returns how many.

    Stops after ``max_batches`` so one run stays short; the next run goes on.
    ``retention_days`` 0 keeps everything.
    """
    if retention_days <= 0:
        return 0
    before = now - timedelta(days=retention_days)
    deleted = 0
    for _ in range(max_batches):
        n = sql.prune(before, batch_size)
        deleted += n
        if n < batch_size:
            break
    return deleted
