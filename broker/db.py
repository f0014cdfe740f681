"""SQL schema and engine: credentials, subject tokens and audit events.

Credentials are keyed by (user_id, server_key) in real columns, never by a
joined string, so a user named ``alice:x`` can never show up in ``alice``'s
listing. Secrets live only in ``ciphertext``; everything else is the plaintext
metadata that scheduling and listings need.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.types import TypeDecorator

__all__ = ["metadata", "credentials", "subject_tokens", "audit_events", "connection_events", "event_cursors",
           "webhook_deliveries", "make_engine", "UTCDateTime", "db_now"]


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: SQLite and PostgreSQL agree."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class db_now(ColumnElement[datetime]):  # noqa: N801 - reads like the SQL function it renders
    """The database's clock (UTC, naive, like ``UTCDateTime`` stores it), plus
    ``offset`` seconds: leases are compared in one clock, whatever the hosts say.

    PostgreSQL: ``timezone('UTC', clock_timestamp())``; SQLite: ``strftime`` in
    the exact text form SQLAlchemy stores (microseconds), so string order is
    time order.
    """

    inherit_cache = False  # the offset is rendered into the SQL text
    type = UTCDateTime()

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = float(offset)


@compiles(db_now)
def _db_now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    return f"(timezone('UTC', clock_timestamp()) + make_interval(secs => {element.offset!r}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', '{element.offset:+.3f} seconds') || '000')"


metadata = MetaData()

credentials = Table(
    "credentials",
    metadata,
    Column("user_id", String(256), primary_key=True),
    Column("server_key", String(64), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("status", String(24), nullable=False),
    Column("obtained_via", String(24), nullable=False),
    Column("token_type", String(32), nullable=False),
    Column("scopes", Text, nullable=False, default="[]"),
    Column("audience", Text, nullable=True),
    Column("issued_at", UTCDateTime, nullable=True),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("refresh_at", UTCDateTime, nullable=True),
    Column("failure", String(64), nullable=True),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("version", Integer, nullable=False),
    # The lease fence: only the owner may present this row's refresh token (or
    # its user's subject token for this server) until ``lease_until``, in the
    # database's clock. Redis claims only tell waiters whom to join.
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    # Backoff after a failed renewal: no attempt before this, from beat or resolve.
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("failure_count", Integer, nullable=False, default=0, server_default="0"),
    # When an idle refresh token must be exercised before it dies of disuse.
    Column("keepalive_at", UTCDateTime, nullable=True),
    # The status last announced as a connection event (broker.events).
    Column("announced_status", String(24), nullable=True),
    Index("ix_credentials_expires_at", "expires_at"),
    # The beat's due scan: refresh point reached, most recent first filter.
    Index("ix_credentials_refresh_at", "refresh_at"),
    Index("ix_credentials_key_id", "key_id"),
    # The due scan takes a fair share per server (a failing server's backlog
    # must not hide healthy servers' due credentials).
    Index("ix_credentials_server_refresh_at", "server_key", "refresh_at"),
    Index("ix_credentials_keepalive_at", "keepalive_at"),
)

subject_tokens = Table(
    "subject_tokens",
    metadata,
    Column("user_id", String(256), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_subject_tokens_key_id", "key_id"),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", UTCDateTime, nullable=False),
    Column("user_id", String(256), nullable=True),
    Column("server", String(128), nullable=True),
    Column("method", String(24), nullable=True),
    Column("action", String(24), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("request_id", String(128), nullable=True),
    Index("ix_audit_ts", "ts"),
    Index("ix_audit_user_ts", "user_id", "ts"),
    Index("ix_audit_server_ts", "server", "ts"),
)


# Connection lifecycle events: the outbox, written in the transaction that
# changed the credential's status; read oldest first by id.
_EventId = BigInteger().with_variant(Integer, "sqlite")

connection_events = Table(
    "connection_events",
    metadata,
    Column("id", _EventId, primary_key=True, autoincrement=True),
    Column("type", String(40), nullable=False),
    Column("user_id", String(256), nullable=False),
    Column("server_key", String(64), nullable=False),
    Column("status", String(24), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_connection_events_user", "user_id", "id"),
)

# How far each outbox consumer (the webhook dispatcher) has read.
event_cursors = Table(
    "event_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

# One row per webhook delivery attempt; outcome "dead" after the last one.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", _EventId, primary_key=True, autoincrement=True),
    Column("event_id", BigInteger, nullable=False),
    Column("endpoint", String(300), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", String(64), nullable=True),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_webhook_deliveries_event", "event_id", "endpoint"),
    Index("ix_webhook_deliveries_outcome", "outcome", "at"),
)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for many short transactions from worker threads."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers proceed during a write; several processes share the file.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, **kwargs)
