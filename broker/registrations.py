"""Dynamically registered clients, one row per server, sealed like credentials.

A server added by URL alone (``discover: mcp``) needs a discovery and a
client registration before its first connect URL. Both run once for the
whole deployment: the first caller inserts the row (a primary-key unique
insert is the single flight, across threads, processes and hosts), the others
wait for it to turn ``ready``. The discovered endpoints (no secret) are plain
JSON; the client id and secret are sealed with the keyring, bound to the
server key. A server that forgets the client (``invalid_client``) has its row
dropped by generation, so the next caller registers afresh, once.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Column, Engine, LargeBinary, String, Table, Text, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .clock import Clock, SystemClock
from .crypto import Keyring, record_ad
from .db import UTCDateTime, metadata
from .errors import BrokerError, ServiceUnavailable, StoreDisabled, error_from_dict
from .oauth.mcp_discovery import Discovered, Registered

__all__ = ["registered_clients", "ClientRegistration", "RegistrationStore", "KIND_CLIENT"]

log = logging.getLogger(__name__)

KIND_CLIENT = "registered_client"

registered_clients = Table(
    "registered_clients",
    metadata,
    Column("server_key", String(64), primary_key=True),
    Column("status", String(16), nullable=False),  # pending | ready
    Column("generation", String(32), nullable=False),
    Column("claim_until", UTCDateTime, nullable=True),
    Column("discovered", Text, nullable=True),  # JSON, no secret
    Column("ciphertext", LargeBinary, nullable=True),
    Column("key_id", String(32), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True, repr=False)
class ClientRegistration:
    """A ready row: where to go and who we are there."""

    server_key: str
    generation: str
    discovered: Discovered
    client: Registered

    def __repr__(self) -> str:
        return f"ClientRegistration(server_key={self.server_key[:12]!r}, generation={self.generation!r})"


Work = Callable[[], tuple[Discovered, Registered]]


class RegistrationStore:
    """Get the server's registration, running ``work`` once deployment-wide when there is none."""

    def __init__(self, engine: Engine, keyring: Keyring | None, *, clock: Clock | None = None,
                 claim_seconds: float = 30.0, wait_seconds: float = 30.0, failure_seconds: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.engine = engine
        self.keyring = keyring
        self.clock = clock or SystemClock()
        self.claim_seconds = claim_seconds
        self.wait_seconds = wait_seconds
        # A failed discovery or registration is answered from the row this long (no herd).
        self.failure_seconds = failure_seconds
        self._sleep = sleep

    def get(self, server_key: str) -> ClientRegistration | None:
        """The ready registration, read from the database each time.

        Not cached in the process: when one process learns the server forgot
        the client, every process must stop using it (one primary-key read
        beside an HTTP call to the authorization server costs nothing).
        """
        with self.engine.connect() as conn:
            row = conn.execute(select(registered_clients).where(registered_clients.c.server_key == server_key)).first()
        return self._ready(row)

    def get_or_register(self, server_key: str, work: Work) -> ClientRegistration:
        """The registration; the one caller that inserts the row runs ``work``, the rest wait."""
        if self.keyring is None:
            raise StoreDisabled()
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.02
        while True:
            with self.engine.connect() as conn:
                row = conn.execute(select(registered_clients).where(
                    registered_clients.c.server_key == server_key)).first()
            found = self._ready(row)
            if found is not None:
                return found
            if row is not None and row.status == "failed" and row.claim_until > self.clock.now():
                raise error_from_dict(json.loads(row.discovered))  # the recent failure, once for all
            generation = self._claim(server_key)
            if generation is not None:
                return self._run(server_key, generation, work)
            if time.monotonic() >= deadline:
                raise ServiceUnavailable("client registration for this server is still in progress; retry")
            self._sleep(delay)  # another process holds the claim: wait for its row
            delay = min(delay * 2, 0.5)

    def forget(self, server_key: str, generation: str) -> bool:
        """Drop the registration the server no longer knows (only that generation)."""
        with self.engine.begin() as conn:
            gone = conn.execute(delete(registered_clients).where(
                registered_clients.c.server_key == server_key,
                registered_clients.c.generation == generation)).rowcount
        if gone:
            log.warning("server %s forgot its registered client; it will be registered again", server_key[:12])
        return bool(gone)

    # -- internals ---------------------------------------------------------------

    def _claim(self, server_key: str) -> str | None:
        now = self.clock.now()
        generation = uuid.uuid4().hex
        values = {"status": "pending", "generation": generation,
                  "claim_until": now + timedelta(seconds=self.claim_seconds), "updated_at": now}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(registered_clients).values(server_key=server_key, created_at=now, **values))
            return generation
        except IntegrityError:
            pass
        # A claim whose holder died (past claim_until, still pending) may be taken
        # over, and so may a failure old enough to try again.
        with self.engine.begin() as conn:
            taken = conn.execute(update(registered_clients).where(
                registered_clients.c.server_key == server_key,
                registered_clients.c.status.in_(("pending", "failed")),
                registered_clients.c.claim_until < now).values(**values)).rowcount
        return generation if taken else None

    def _run(self, server_key: str, generation: str, work: Work) -> ClientRegistration:
        try:
            discovered, client = work()
        except BrokerError as exc:
            # Kept briefly so concurrent and following callers get the same answer
            # without asking the server again; messages are secret-free by design.
            with self.engine.begin() as conn:
                conn.execute(update(registered_clients).where(
                    registered_clients.c.server_key == server_key,
                    registered_clients.c.generation == generation).values(
                    status="failed", discovered=json.dumps(exc.to_dict()), updated_at=self.clock.now(),
                    claim_until=self.clock.now() + timedelta(seconds=self.failure_seconds)))
            raise
        except BaseException:
            with self.engine.begin() as conn:  # let the next caller try at once
                conn.execute(delete(registered_clients).where(
                    registered_clients.c.server_key == server_key,
                    registered_clients.c.generation == generation))
            raise
        assert self.keyring is not None
        payload = {"id": client.client_id, "secret": client.client_secret, "auth": client.auth_method}
        blob = self.keyring.encrypt(json.dumps(payload).encode(), record_ad(KIND_CLIENT, "", server_key))
        now = self.clock.now()
        with self.engine.begin() as conn:
            conn.execute(update(registered_clients).where(
                registered_clients.c.server_key == server_key,
                registered_clients.c.generation == generation).values(
                status="ready", claim_until=None, discovered=json.dumps(discovered.to_dict()),
                ciphertext=blob, key_id=self.keyring.active_kid, updated_at=now))
        return ClientRegistration(server_key, generation, discovered, client)

    def count_stale_keys(self) -> int:
        """Registered clients not yet under the active key."""
        if self.keyring is None:
            return 0
        t = registered_clients
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(t).where(
                t.c.status == "ready", t.c.key_id != self.keyring.active_kid)).scalar_one())

    def reencrypt(self) -> tuple[int, int]:
        """Move every registered client to the active key (rotate-keys); returns
        (rewritten, unreadable). A registration is one row per server, so there
        are few: one pass, each row rewritten only if its generation is unchanged."""
        if self.keyring is None:
            return 0, 0
        t, kid = registered_clients, self.keyring.active_kid
        with self.engine.connect() as conn:
            rows = conn.execute(select(t).where(t.c.status == "ready", t.c.key_id != kid)).all()
        rewritten = unreadable = 0
        for row in rows:
            ad = record_ad(KIND_CLIENT, "", row.server_key)
            try:
                plain = self.keyring.decrypt(bytes(row.ciphertext), ad)
            except Exception:  # noqa: BLE001 - no configured key opens it: it re-registers on use
                unreadable += 1
                continue
            with self.engine.begin() as conn:
                rewritten += conn.execute(update(t).where(
                    t.c.server_key == row.server_key, t.c.generation == row.generation, t.c.key_id == row.key_id,
                ).values(ciphertext=self.keyring.encrypt(plain, ad), key_id=kid)).rowcount
        return rewritten, unreadable

    def _ready(self, row: Any) -> ClientRegistration | None:
        if row is None or row.status != "ready" or self.keyring is None:
            return None
        try:
            payload = json.loads(self.keyring.decrypt(bytes(row.ciphertext), record_ad(KIND_CLIENT, "", row.server_key)))
        except Exception:  # noqa: BLE001 - unreadable (key removed): register again
            log.warning("unreadable registered client for server %s; registering again", row.server_key[:12])
            self.forget(row.server_key, row.generation)
            return None
        return ClientRegistration(
            row.server_key, row.generation, Discovered.from_dict(json.loads(row.discovered)),
            Registered(payload["id"], payload.get("secret"), payload.get("auth") or "client_secret_post"),
        )
