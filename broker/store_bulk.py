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
from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, select
from sqlalchemy.dialects import postgresql, sqlite

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


# Built once per dialect and run as one executemany: SQLAlchemy's
# "insertmanyvalues" sends it as multi-row INSERTs from a cached compilation.
_INSERTS = {
    name: dialect.insert(T).on_conflict_do_nothing(index_elements=[T.c.user_id, T.c.server_key])
    .returning(T.c.user_id)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_EVENTS = insert(E)


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
        stmt = _INSERTS.get(conn.dialect.name)
        if stmt is None:
            raise NotImplementedError(f"bulk insert on {conn.dialect.name}")
        written = {r[0] for r in conn.execute(stmt, rows)}
        if written:
            conn.execute(_EVENTS, [{"type": CONNECTED, "user_id": u, "server_key": server_key, "status": status,
                                      "reason": None, "at": now} for u, _ in minted if u in written])
    return written
