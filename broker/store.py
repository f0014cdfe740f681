"""The encrypted credential store (SQLAlchemy; SQLite or PostgreSQL).

Secrets are sealed with the keyring, bound to (kind, user_id, server_key); the
plaintext columns hold only what scheduling and listings need. ``version`` is
the refresh fence: ``compare_and_swap`` writes only if the record still has
the version the writer read, so a late or repeated refresh can never
overwrite a newer credential.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, and_, delete, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from .clock import Clock, SystemClock
from .crypto import DecryptError, Keyring, record_ad
from .db import credentials as T
from .db import db_now
from .db import subject_tokens as S
from .errors import ServiceUnavailable, StoreDisabled
from .lease import LeaseTake
from .models import Credential, CredentialStatus, ObtainedVia, StoredCredential, SubjectToken, refresh_point
from .secret import Secret

__all__ = ["CredentialStore", "RotationReport", "KIND_CREDENTIAL", "KIND_SUBJECT"]

log = logging.getLogger(__name__)

KIND_CREDENTIAL = "credential"
KIND_SUBJECT = "subject_token"

P = ParamSpec("P")
R = TypeVar("R")


def _guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Store disabled without a key; a database outage becomes a clear 503."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        if self.keyring is None:  # type: ignore[attr-defined]
            raise StoreDisabled()
        try:
            return fn(*args, **kwargs)
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, IntegrityError):
                raise
            # The driver message can hold SQL and bound values: keep it out.
            log.warning("database error in store.%s: %s", fn.__name__, type(exc.orig).__name__)
            raise ServiceUnavailable("database unavailable") from None

    return wrapper


@dataclass
class RotationReport:
    """What a re-encryption pass did."""

    rewritten: int = 0
    already_current: int = 0
    unreadable: int = 0
    skipped_concurrent: int = 0


class CredentialStore:
    """Per-user credentials and subject tokens, encrypted at rest."""

    def __init__(
        self,
        engine: Engine,
        keyring: Keyring | None,
        *,
        clock: Clock | None = None,
        near_expiry: timedelta = timedelta(seconds=60),
        refresh_fraction: float = 0.8,
    ) -> None:
        self.engine = engine
        self.keyring = keyring
        self.clock = clock or SystemClock()
        self.near_expiry = near_expiry
        self.refresh_fraction = refresh_fraction
        self.decrypt_failures = 0

    @property
    def enabled(self) -> bool:
        return self.keyring is not None

    # -- sealing ---------------------------------------------------------

    def _seal(self, payload: dict[str, Any], kind: str, user_id: str, server_key: str) -> tuple[bytes, str]:
        assert self.keyring is not None
        blob = self.keyring.encrypt(json.dumps(payload).encode(), record_ad(kind, user_id, server_key))
        return blob, self.keyring.active_kid

    def _open(self, blob: bytes, kind: str, user_id: str, server_key: str) -> dict[str, Any] | None:
        assert self.keyring is not None
        try:
            return json.loads(self.keyring.decrypt(bytes(blob), record_ad(kind, user_id, server_key)))
        except DecryptError as exc:
            self.decrypt_failures += 1
            # user ids are not secret; the record's content never reaches this line
            log.warning("unreadable %s record for user %r server %s: %s", kind, user_id, server_key[:12], exc.message)
            return None

    def _row_to_stored(self, row: Any) -> StoredCredential | None:
        payload = self._open(row.ciphertext, KIND_CREDENTIAL, row.user_id, row.server_key)
        if payload is None:
            return None
        refresh = payload.get("r")
        cred = Credential(
            access_token=Secret(payload["a"]),
            refresh_token=Secret(refresh) if refresh else None,
            obtained_via=ObtainedVia(row.obtained_via),
            token_type=row.token_type,
            expires_at=row.expires_at,
            issued_at=row.issued_at,
            scopes=tuple(json.loads(row.scopes or "[]")),
            audience=row.audience,
        )
        return StoredCredential(
            user_id=row.user_id,
            server_key=row.server_key,
            credential=cred,
            status=CredentialStatus(row.status),
            version=row.version,
            updated_at=row.updated_at,
            last_used_at=row.last_used_at,
            refresh_at=row.refresh_at,
            failure=row.failure,
            lease_owner=row.lease_owner,
            lease_until=row.lease_until,
        )

    def _values(self, user_id: str, server_key: str, cred: Credential, status: CredentialStatus,
                now: datetime, failure: str | None) -> dict[str, Any]:
        blob, kid = self._seal(
            {"a": cred.access_token.reveal(), "r": cred.refresh_token.reveal() if cred.refresh_token else None},
            KIND_CREDENTIAL, user_id, server_key,
        )
        return {
            "ciphertext": blob,
            "key_id": kid,
            "status": status.value,
            "obtained_via": cred.obtained_via.value,
            "token_type": cred.token_type,
            "scopes": json.dumps(list(cred.scopes)),
            "audience": cred.audience,
            "issued_at": cred.issued_at,
            "expires_at": cred.expires_at,
            "refresh_at": refresh_point(cred.issued_at, cred.expires_at, self.near_expiry, self.refresh_fraction),
            "failure": failure,
            "updated_at": now,
        }

    # -- credentials -------------------------------------------------------

    @_guarded
    def get(self, user_id: str, server_key: str) -> StoredCredential | None:
        """The user's credential for a server; an unreadable record reads as absent."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(T).where(and_(T.c.user_id == user_id, T.c.server_key == server_key))
            ).first()
        return None if row is None else self._row_to_stored(row)

    @_guarded
    def compare_and_swap(
        self,
        user_id: str,
        server_key: str,
        expected_version: int | None,
        credential: Credential,
        *,
        status: CredentialStatus = CredentialStatus.CONNECTED,
        failure: str | None = None,
        last_used_at: datetime | None = None,
        lease_owner: str | None = None,
    ) -> StoredCredential | None:
        """Write only if the record still has ``expected_version`` (None: only if
        absent). Returns the new record, or None when the fence moved.
        ``last_used_at`` records a caller's use in the same write. With
        ``lease_owner``, write only while that owner holds the lease (expired
        but not taken over still counts), and release it in the same write."""
        now = self.clock.now()
        values = self._values(user_id, server_key, credential, status, now, failure)
        if last_used_at is not None:
            values["last_used_at"] = last_used_at
        with self.engine.begin() as conn:
            if expected_version is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(T).values(user_id=user_id, server_key=server_key,
                                                      created_at=now, version=1, **values))
                except IntegrityError:
                    return None
                new_version = 1
            else:
                cond = [T.c.user_id == user_id, T.c.server_key == server_key, T.c.version == expected_version]
                if lease_owner is not None:
                    cond.append(T.c.lease_owner == lease_owner)
                    values.update(lease_owner=None, lease_until=None)
                result = conn.execute(update(T).where(and_(*cond)).values(version=expected_version + 1, **values))
                if result.rowcount != 1:
                    return None
                new_version = expected_version + 1
        return StoredCredential(user_id, server_key, credential, status, new_version, now,
                                last_used_at=last_used_at, refresh_at=values["refresh_at"], failure=failure)

    def put(self, user_id: str, server_key: str, credential: Credential, *,
            status: CredentialStatus = CredentialStatus.CONNECTED) -> StoredCredential:
        """Write unconditionally (connect callback, first mint); bumps the version."""
        for _ in range(8):
            current = self._current_version(user_id, server_key)
            stored = self.compare_and_swap(user_id, server_key, current, credential, status=status)
            if stored is not None:
                return stored
        raise ServiceUnavailable("credential record is changing too fast to write")

    @_guarded
    def _current_version(self, user_id: str, server_key: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(T.c.version).where(and_(T.c.user_id == user_id, T.c.server_key == server_key))
            ).scalar_one_or_none()

    @_guarded
    def set_status(self, user_id: str, server_key: str, status: CredentialStatus, *,
                   expected_version: int | None = None, failure: str | None = None) -> bool:
        """Change status (degraded, needs_reconnect) if the record still has
        ``expected_version``; secrets untouched.

        The version does not move: it fences the secrets, and a status note must
        never make a refresh's write fail after the provider rotated the token
        (the rotated token would be lost and the stored one is already spent).
        """
        cond = [T.c.user_id == user_id, T.c.server_key == server_key]
        if expected_version is not None:
            cond.append(T.c.version == expected_version)
        with self.engine.begin() as conn:
            result = conn.execute(
                update(T).where(and_(*cond)).values(status=status.value, failure=failure, updated_at=self.clock.now())
            )
        return result.rowcount == 1

    # -- the lease fence (see broker.lease) ------------------------------------

    @_guarded
    def take_lease(self, observed: StoredCredential, owner: str, ttl_seconds: float) -> LeaseTake:
        """One conditional UPDATE: take the row's lease for ``owner`` until the
        database's now + ``ttl_seconds``, if it is free, expired or already ours,
        and the row is still the one observed (version and lease owner), so the
        caller knows exactly whose lease, if any, it took over."""
        user_id, server_key = observed.user_id, observed.server_key
        cond = [
            T.c.user_id == user_id, T.c.server_key == server_key, T.c.version == observed.version,
            T.c.lease_owner.is_not_distinct_from(observed.lease_owner),
            or_(T.c.lease_owner.is_(None), T.c.lease_until < db_now(), T.c.lease_owner == owner),
        ]
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(T).where(and_(*cond)).values(lease_owner=owner, lease_until=db_now(ttl_seconds))
            ).rowcount == 1
        if taken:
            return LeaseTake(True, observed, took_over=observed.lease_owner not in (None, owner))
        return LeaseTake(False, self.get(user_id, server_key))

    @_guarded
    def expire_lease(self, user_id: str, server_key: str, owner: str) -> bool:
        """End ``owner``'s lease now without releasing it: the next flight takes
        it over knowing this one's outcome is unknown (a call that got no answer)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(T).where(and_(T.c.user_id == user_id, T.c.server_key == server_key, T.c.lease_owner == owner))
                .values(lease_until=db_now())
            ).rowcount == 1

    @_guarded
    def release_lease(self, user_id: str, server_key: str, owner: str) -> bool:
        """Free the lease if ``owner`` still holds it (a no-op after a write released it)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(T).where(and_(T.c.user_id == user_id, T.c.server_key == server_key, T.c.lease_owner == owner))
                .values(lease_owner=None, lease_until=None)
            ).rowcount == 1

    @_guarded
    def touch(self, user_id: str, server_key: str, when: datetime | None = None) -> None:
        """Record use, so proactive refresh only spends effort on active users."""
        with self.engine.begin() as conn:
            conn.execute(
                update(T).where(and_(T.c.user_id == user_id, T.c.server_key == server_key))
                .values(last_used_at=when or self.clock.now())
            )

    @_guarded
    def touch_many(self, uses: list[tuple[str, str, datetime]]) -> None:
        """Record many uses in one transaction (the beat flushes client use marks)."""
        if not uses:
            return
        from sqlalchemy import bindparam

        stmt = (
            update(T)
            .where(and_(T.c.user_id == bindparam("u"), T.c.server_key == bindparam("k")))
            .values(last_used_at=bindparam("t"))
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, [{"u": u, "k": k, "t": t} for u, k, t in uses])

    @_guarded
    def delete(self, user_id: str, server_key: str, *, expected_version: int | None = None,
               lease_owner: str | None = None) -> bool:
        """Delete the record; with ``expected_version``/``lease_owner``, only that
        version and only while that owner holds its lease (disconnect)."""
        cond = [T.c.user_id == user_id, T.c.server_key == server_key]
        if expected_version is not None:
            cond.append(T.c.version == expected_version)
        if lease_owner is not None:
            cond.append(T.c.lease_owner == lease_owner)
        with self.engine.begin() as conn:
            result = conn.execute(delete(T).where(and_(*cond)))
        return result.rowcount == 1

    @_guarded
    def list(self, user_id: str) -> list[StoredCredential]:
        """The user's upstream credentials (never subject tokens), readable ones only."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(T).where(T.c.user_id == user_id).order_by(T.c.server_key)).all()
        return [s for s in (self._row_to_stored(r) for r in rows) if s is not None]

    def due_statement(self, now: datetime, used_since: datetime, limit: int = 1000) -> Any:
        """The due scan's SELECT (see ``due``); public so its plan can be checked."""
        statuses = (CredentialStatus.CONNECTED.value, CredentialStatus.DEGRADED.value)
        return (
            select(T.c.user_id, T.c.server_key)
            .where(and_(T.c.refresh_at <= now, T.c.refresh_at >= used_since, T.c.last_used_at >= used_since,
                        T.c.status.in_(statuses)))
            .order_by(T.c.refresh_at)
            .limit(limit)
        )

    @_guarded
    def due(self, now: datetime, used_since: datetime, limit: int = 1000) -> builtins.list[tuple[str, str]]:
        """(user_id, server_key) pairs whose refresh point has passed and that were
        used recently: an indexed range scan on ``refresh_at``.

        The range starts at ``used_since`` too: an idle credential's refresh point
        stays in the past forever, and without a lower bound every one of them
        would be read on every scan. A credential in use cannot sit past its
        refresh point for long (a caller's flight renews it), so nothing in use is
        missed, and the cost grows with the number due, not the number stored.
        """
        with self.engine.connect() as conn:
            return [(r.user_id, r.server_key) for r in conn.execute(self.due_statement(now, used_since, limit))]

    # -- subject tokens ------------------------------------------------------

    @_guarded
    def put_subject_token(self, user_id: str, token: SubjectToken) -> None:
        now = self.clock.now()
        blob, kid = self._seal({"t": token.token.reveal()}, KIND_SUBJECT, user_id, "")
        values = {"ciphertext": blob, "key_id": kid, "expires_at": token.expires_at, "updated_at": now}
        with self.engine.begin() as conn:
            result = conn.execute(update(S).where(S.c.user_id == user_id).values(version=S.c.version + 1, **values))
            if result.rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(S).values(user_id=user_id, version=1, **values))
                except IntegrityError:
                    conn.execute(update(S).where(S.c.user_id == user_id).values(version=S.c.version + 1, **values))

    @_guarded
    def get_subject_token(self, user_id: str) -> SubjectToken | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(S).where(S.c.user_id == user_id)).first()
        if row is None:
            return None
        payload = self._open(row.ciphertext, KIND_SUBJECT, user_id, "")
        if payload is None:
            return None
        return SubjectToken(Secret(payload["t"]), row.expires_at)

    @_guarded
    def delete_subject_token(self, user_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(S).where(S.c.user_id == user_id)).rowcount == 1

    # -- key rotation ----------------------------------------------------------

    @_guarded
    def count_stale_keys(self) -> int:
        """Records not yet under the active key (what rotate-keys has left)."""
        assert self.keyring is not None
        from sqlalchemy import func

        kid = self.keyring.active_kid
        with self.engine.connect() as conn:
            a = conn.execute(select(func.count()).select_from(T).where(T.c.key_id != kid)).scalar_one()
            b = conn.execute(select(func.count()).select_from(S).where(S.c.key_id != kid)).scalar_one()
        return int(a) + int(b)

    def reencrypt(self, batch_size: int = 500, on_batch: Callable[[int], None] | None = None) -> RotationReport:
        """Move every record to the active key, in batches, online and resumable.

        The version is not bumped (a concurrent refresh's fence must not trip),
        and each row is rewritten only if version and key id are unchanged.
        """
        report = RotationReport()
        for done in self._reencrypt_table(T, KIND_CREDENTIAL, batch_size, report):
            if on_batch:
                on_batch(done)
        for done in self._reencrypt_table(S, KIND_SUBJECT, batch_size, report):
            if on_batch:
                on_batch(done)
        return report

    @_guarded
    def _reencrypt_table(self, table: Any, kind: str, batch_size: int, report: RotationReport) -> Iterator[int]:
        assert self.keyring is not None
        kid = self.keyring.active_kid
        is_cred = table is T
        keys = [table.c.user_id, table.c.server_key] if is_cred else [table.c.user_id]
        last: tuple[Any, ...] | None = None
        while True:
            stmt = select(table).where(table.c.key_id != kid).order_by(*keys).limit(batch_size)
            if last is not None:
                from sqlalchemy import tuple_

                stmt = stmt.where(tuple_(*keys) > tuple_(*last)) if is_cred else stmt.where(table.c.user_id > last[0])
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            with self.engine.begin() as conn:
                for row in rows:
                    server_key = row.server_key if is_cred else ""
                    payload = self._open(row.ciphertext, kind, row.user_id, server_key)
                    if payload is None:
                        report.unreadable += 1
                        continue
                    blob, new_kid = self._seal(payload, kind, row.user_id, server_key)
                    cond = [table.c.user_id == row.user_id, table.c.version == row.version,
                            table.c.key_id == row.key_id]
                    if is_cred:
                        cond.append(table.c.server_key == row.server_key)
                    result = conn.execute(update(table).where(and_(*cond)).values(ciphertext=blob, key_id=new_kid))
                    if result.rowcount == 1:
                        report.rewritten += 1
                    else:
                        report.skipped_concurrent += 1
            last = tuple(getattr(rows[-1], k.name) for k in keys)
            yield len(rows)
