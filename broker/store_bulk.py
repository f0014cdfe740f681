"""The store for many users of one server at once: what a bulk warm reads and
the first mints it writes.

Warming thousands of users one row at a time spends more of the machine on
statements than on the provider; a batch reads its rows in two statements
and writes its first mints in one transaction. The rules are the single-row
ones (``CredentialStore.compare_and_swap`` with no expected version): a row
someone else inserted first is left alone and reported, and each inserted
row's ``connection.connected`` event goes out in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, LargeBinary, and_, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from .db import UTCDateTime
from .db import connection_events as E
from .db import credentials as T
from .db import subject_tokens as S
from .events import CONNECTED
from .models import Credential, CredentialStatus, SubjectToken
from .secret import Secret
from .store import KIND_SUBJECT, CredentialStore, StoredCredential, _guarded

__all__ = ["get_many", "subject_tokens", "insert_first_mints"]

# Bound parameters per statement stay far below every driver's limit.
_CHUNK = 500


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


@_guarded
def get_many(store: CredentialStore, server_key: str, user_ids: Sequence[str]) -> dict[str, StoredCredential]:
    """The stored credentials of ``user_ids`` for one server (unreadable rows read as absent)."""
    out: dict[str, StoredCredential] = {}
    with store.engine.connect() as conn:
        for chunk in _chunks(user_ids):
            rows = conn.execute(select(T).where(and_(T.c.server_key == server_key, T.c.user_id.in_(chunk))))
            for row in rows:
                stored = store._row_to_stored(row)
                if stored is not None:
                    out[row.user_id] = stored
    return out


@_guarded
def subject_tokens(store: CredentialStore, user_ids: Sequence[str]) -> dict[str, SubjectToken]:
    """The stored subject tokens of ``user_ids`` (unreadable ones read as absent)."""
    out: dict[str, SubjectToken] = {}
    with store.engine.connect() as conn:
        for chunk in _chunks(user_ids):
            for row in conn.execute(select(S.c.user_id, S.c.ciphertext, S.c.expires_at).where(S.c.user_id.in_(chunk))):
                payload = store._open(row.ciphertext, KIND_SUBJECT, row.user_id, "")
                if payload is not None:
                    out[row.user_id] = SubjectToken(Secret(payload["t"]), row.expires_at)
    return out


# SQLite (and the fallback): one executemany, which SQLAlchemy's
# "insertmanyvalues" sends as multi-row INSERTs from a cached compilation.
_INSERTS = {
    name: dialect.insert(T).on_conflict_do_nothing(index_elements=[T.c.user_id, T.c.server_key])
    .returning(T.c.user_id)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_EVENTS = insert(E)

# PostgreSQL: one fixed statement, rows and events together. A column per
# array parameter (``unnest``) keeps the text and its parameter count the same
# for any number of rows, so neither SQLAlchemy nor psycopg parses it again.
_PG_COLUMNS = ("user_id", "server_key", "ciphertext", "key_id", "status", "obtained_via", "token_type", "scopes",
               "audience", "issued_at", "expires_at", "refresh_at", "failure", "last_used_at", "created_at",
               "updated_at", "version", "next_attempt_at", "failure_count", "keepalive_at", "announced_status")


def _pg_array(column: str) -> str:
    kind = T.c[column].type
    base = ("bytea" if isinstance(kind, LargeBinary) else "timestamp" if isinstance(kind, UTCDateTime)
            else "int" if isinstance(kind, Integer) else "text")
    return f"%({column})s::{base}[]"


_PG_FIRST_MINTS = (
    f"WITH ins AS (INSERT INTO {T.name} ({', '.join(_PG_COLUMNS)}) "
    f"SELECT * FROM unnest({', '.join(_pg_array(c) for c in _PG_COLUMNS)}) "
    "ON CONFLICT (user_id, server_key) DO NOTHING RETURNING user_id), "
    f"ev AS (INSERT INTO {E.name} (type, user_id, server_key, status, reason, at) "
    "SELECT %(ev_type)s, user_id, %(ev_server)s, %(ev_status)s, NULL, %(ev_at)s FROM ins) "
    "SELECT user_id FROM ins"
)


def _naive_utc(value: Any) -> Any:
    return value.astimezone(UTC).replace(tzinfo=None) if isinstance(value, datetime) else value


@_guarded
def insert_first_mints(store: CredentialStore, server_key: str, minted: Sequence[tuple[str, Credential]],
                       *, used_at: datetime | None = None) -> set[str]:
    """Insert the first credential of each ``(user_id, credential)`` that has no
    row yet, with its ``connection.connected`` event, in one transaction.
    Returns the users written; a user whose row appeared meanwhile is not
    (another flight minted first: serve its record, as a single mint does)."""
    if not minted:
        return set()
    now = store.clock.now()
    status = CredentialStatus.CONNECTED.value
    rows = []
    for user_id, cred in minted:
        values = store._values(user_id, server_key, cred, CredentialStatus.CONNECTED, now, None)
        # Announced in this transaction: the event row below is the announcement.
        rows.append(dict(values, user_id=user_id, server_key=server_key, created_at=now, version=1,
                         last_used_at=used_at, lease_owner=None, lease_until=None, announced_status=status))
    with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            params: dict[str, Any] = {c: [_naive_utc(r[c]) for r in rows] for c in _PG_COLUMNS}
            params.update(ev_type=CONNECTED, ev_server=server_key, ev_status=status, ev_at=_naive_utc(now))
            return {r[0] for r in conn.exec_driver_sql(_PG_FIRST_MINTS, params)}
        stmt = _INSERTS.get(conn.dialect.name)
        if stmt is None:
            raise NotImplementedError(f"bulk insert on {conn.dialect.name}")
        written = {r[0] for r in conn.execute(stmt, rows)}
        if written:
            conn.execute(_EVENTS, [{"type": CONNECTED, "user_id": u, "server_key": server_key, "status": status,
                                      "reason": None, "at": now} for u, _ in minted if u in written])
    return written
