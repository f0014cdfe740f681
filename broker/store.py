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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, and_, case, delete, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from . import due_scan
from .clock import Clock, SystemClock
from .crypto import DecryptError, Keyring, record_ad
from .dpop import DPoPKey
from .db import credentials as T
from .db import db_now
from .db import subject_tokens as S
from .errors import ServiceUnavailable, StoreDisabled
from .events import announce, announce_removed
from .lease import LeaseTake
from .models import Credential, CredentialStatus, ObtainedVia, StoredCredential, SubjectToken, refresh_point
from .secret import Secret

__all__ = ["CredentialStore", "RotationReport", "KIND_CREDENTIAL", "KIND_SUBJECT", "UNTIL_SUBJECT_CHANGES",
           "keepalive_point"]

log = logging.getLogger(__name__)

KIND_CREDENTIAL = "credential"
KIND_SUBJECT = "subject_token"

# ``next_attempt_at`` of a mint that failed permanently: no attempt until the
# user's subject token changes (``put_subject_token`` clears it).
UNTIL_SUBJECT_CHANGES = datetime(9999, 1, 1, tzinfo=UTC)
_EXCHANGE_VIA = (ObtainedVia.TOKEN_EXCHANGE.value, ObtainedVia.ENTRA_OBO.value)

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


def keepalive_point(renewed_at: datetime, idle_seconds: float) -> datetime:
    """When an idle refresh token must be exercised: its idle limit after the
    last successful renewal, less a margin (a fifth, at most a week) that
    leaves room for scan delays and a few backed-off retries."""
    margin = min(idle_seconds / 5, 7 * 86400.0)
    return renewed_at + timedelta(seconds=idle_seconds - margin)


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
        idle_seconds: Callable[[str], float | None] | None = None,
    ) -> None:
        self.engine = engine
        # server_key -> refresh-token idle limit (oauth_connect servers that have one).
        self.idle_seconds = idle_seconds
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
        try:
            dpop_key = DPoPKey.from_private_jwk(payload["d"]) if payload.get("d") else None
        except (ValueError, KeyError, TypeError):
            self.decrypt_failures += 1
            log.warning("unreadable DPoP key in credential record for user %r server %s", row.user_id, row.server_key[:12])
            return None
        cred = Credential(
            access_token=Secret(payload["a"]),
            refresh_token=Secret(refresh) if refresh else None,
            obtained_via=ObtainedVia(row.obtained_via),
            token_type=row.token_type,
            expires_at=row.expires_at,
            issued_at=row.issued_at,
            scopes=tuple(json.loads(row.scopes or "[]")),
            audience=row.audience,
            dpop_key=dpop_key,
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
            next_attempt_at=row.next_attempt_at,
            failure_count=row.failure_count or 0,
            keepalive_at=row.keepalive_at,
            lease_owner=row.lease_owner,
            lease_until=row.lease_until,
        )

    def _values(self, user_id: str, server_key: str, cred: Credential, status: CredentialStatus,
                now: datetime, failure: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "a": cred.access_token.reveal(), "r": cred.refresh_token.reveal() if cred.refresh_token else None,
        }
        if cred.dpop_key is not None:
            payload["d"] = cred.dpop_key.to_private_jwk()  # sealed with the tokens it binds
        blob, kid = self._seal(payload, KIND_CREDENTIAL, user_id, server_key)
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
            # A written credential is a success: backoff starts over.
            "next_attempt_at": None,
            "failure_count": 0,
            "keepalive_at": self._keepalive_at(server_key, cred, now),
        }

    def _keepalive_at(self, server_key: str, cred: Credential, now: datetime) -> datetime | None:
        if cred.refresh_token is None or self.idle_seconds is None:
            return None
        idle = self.idle_seconds(server_key)
        return None if not idle else keepalive_point(now, idle)

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
            announce(conn, user_id, server_key, now, created=status.value if expected_version is None else None)
        return StoredCredential(user_id, server_key, credential, status, new_version, now,
                                last_used_at=last_used_at, refresh_at=values["refresh_at"], failure=failure,
                                keepalive_at=values["keepalive_at"])

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
            announce(conn, user_id, server_key, self.clock.now())
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
    def record_failure(self, user_id: str, server_key: str, *, expected_version: int, failure: str,
                       failure_count: int, next_attempt_at: datetime | None,
                       status: CredentialStatus | None = None) -> bool:
        """Record a failed renewal and when the next attempt may happen.

        ``refresh_at`` and ``keepalive_at`` move to ``next_attempt_at`` when
        earlier, so a credential in backoff leaves the beat's index ranges
        instead of being read and skipped on every scan. ``needs_reconnect``
        clears both: only the user can help. The version is not bumped: no
        secret changed, and a concurrent successful refresh must still land.
        """
        values: dict[str, Any] = {
            "failure": failure, "failure_count": failure_count, "next_attempt_at": next_attempt_at,
            "updated_at": self.clock.now(),
        }
        if status is not None:
            values["status"] = status.value
        if status is CredentialStatus.NEEDS_RECONNECT:
            values.update(refresh_at=None, keepalive_at=None)
        elif next_attempt_at is not None:
            values["refresh_at"] = case((T.c.refresh_at < next_attempt_at, next_attempt_at), else_=T.c.refresh_at)
            values["keepalive_at"] = case((T.c.keepalive_at < next_attempt_at, next_attempt_at),
                                          else_=T.c.keepalive_at)
        with self.engine.begin() as conn:
            result = conn.execute(
                update(T).where(and_(T.c.user_id == user_id, T.c.server_key == server_key,
                                     T.c.version == expected_version)).values(**values)
            )
            if status is not None and result.rowcount == 1:
                announce(conn, user_id, server_key, self.clock.now())
        return result.rowcount == 1

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
            announce_removed(conn, result.rowcount, user_id, server_key, self.clock.now())
        return result.rowcount == 1

    @_guarded
    def delete_user(self, user_id: str) -> int:
        """Every credential row of the user, readable or not (erasure); returns how many."""
        with self.engine.begin() as conn:
            keys = conn.execute(delete(T).where(T.c.user_id == user_id).returning(T.c.server_key)).scalars().all()
            for key in keys:
                announce_removed(conn, 1, user_id, key, self.clock.now())
            return len(keys)

    @_guarded
    def list(self, user_id: str) -> list[StoredCredential]:
        """The user's upstream credentials (never subject tokens), readable ones only."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(T).where(T.c.user_id == user_id).order_by(T.c.server_key)).all()
        return [s for s in (self._row_to_stored(r) for r in rows) if s is not None]

    def due_statement(self, now: datetime, used_since: datetime, limit: int = 1000,
                      server_key: str | None = None, offset: int = 0) -> Any:
        """The due scan's SELECT; public so its plan can be checked."""
        return due_scan.due_statement(now, used_since, limit, server_key, offset)

    @_guarded
    def due(self, now: datetime, used_since: datetime, limit: int = 1000,
            server_keys: Iterable[str] | None = None) -> builtins.list[tuple[str, str]]:
        """Pairs to renew now, a fair share per server (see ``due_scan.due``)."""
        return due_scan.due(self.engine, now, used_since, limit, server_keys)

    def keepalive_statement(self, now: datetime, limit: int = 1000) -> Any:
        return due_scan.keepalive_statement(now, limit)

    @_guarded
    def keepalive_due(self, now: datetime, limit: int = 1000) -> builtins.list[tuple[str, str]]:
        """Pairs whose idle refresh token must be exercised now (see ``due_scan``)."""
        return due_scan.keepalive_due(self.engine, now, limit)

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
            self._reset_mint_backoff(conn, user_id)

    def _reset_mint_backoff(self, conn: Any, user_id: str) -> None:
        """A new subject token: mints that failed (even permanently) may try again,
        on their ordinary schedule. Per user, so a handful of rows at most."""
        rows = conn.execute(
            select(T.c.server_key, T.c.issued_at, T.c.expires_at)
            .where(and_(T.c.user_id == user_id, T.c.next_attempt_at.is_not(None), T.c.obtained_via.in_(_EXCHANGE_VIA)))
        ).all()
        for row in rows:
            conn.execute(
                update(T).where(and_(T.c.user_id == user_id, T.c.server_key == row.server_key)).values(
                    next_attempt_at=None, failure_count=0,
                    refresh_at=refresh_point(row.issued_at, row.expires_at, self.near_expiry, self.refresh_fraction),
                )
            )

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

