"""The resolve ordering: per-user only, no fallback, ever.

1. a valid cached credential not near expiry: inject it;
2. near expiry or expired: renew (re-mint, or refresh-token grant); if renewal
   fails while the credential is still valid, serve it (stale-if-error);
3. none cached: mint from the subject token, or ``subject_token_missing``;
4. oauth_connect never connected, or unrenewable and expired: ``not_connected``
   with a connect URL and a reason;
5. otherwise ``no_credential``. Never another user's, never a shared token.

The policy hook runs after acquisition, before anything is returned. Every
resolve is audited as inject, acquire, refresh or connect.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .audit import Action, AuditSink, Outcome, record_event
from .clock import Clock
from .connect import OAuthPort
from .errors import (
    OAUTH_ERROR_CODES,
    BrokerError,
    NotConnected,
    ServiceUnavailable,
    SubjectTokenMissing,
    UpstreamError,
    UpstreamOutcomeUnknown,
)
from .lease import ROTATION_LOST, LeaseTake, local_owner
from .models import Credential, CredentialStatus, StoredCredential, refresh_point
from .oauth.backoff import next_attempt_delay
from .oauth.failures import FailureClass, classify
from .policy import Policy, PolicyInput, allow_all, enforce
from .resolved import Resolved, check_nonce, check_request_target, resolved_from, unbound
from .secret import Secret
from .servers import Mode, ServerConfig, ServerRegistry
from .store import UNTIL_SUBJECT_CHANGES, CredentialStore

__all__ = ["Resolver", "Resolved", "Acquisition", "finish", "record_failure", "resolved_from",
           "check_request_target", "check_nonce", "unbound"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acquisition:
    """What a flight produced: the credential and how the resolve is classified."""

    credential: Credential
    action: Action
    outcome: Outcome = Outcome.SUCCESS
    reason: str | None = None
    # True when this acquisition's store write also recorded the caller's use.
    written: bool = field(default=False, compare=False, repr=False)


_Outcome = Acquisition


class Resolver:
    """Decides, acquires, renews and returns per-user credentials."""

    def __init__(
        self,
        servers: ServerRegistry,
        store: CredentialStore,
        oauth: OAuthPort,
        audit: AuditSink,
        clock: Clock,
        *,
        policy: Policy = allow_all,
        connect_url: Callable[[str, str], str | None] | None = None,
        near_expiry: timedelta = timedelta(seconds=60),
        refresh_fraction: float = 0.8,
        touch_interval: timedelta = timedelta(seconds=60),
        lease_seconds: float = 75.0,
        lease_margin: float = 5.0,
        lease_poll: float = 0.1,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        backoff_seconds: float = 10.0,
        backoff_max_seconds: float = 3600.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.servers = servers
        self.store = store
        self.oauth = oauth
        self.audit = audit
        self.clock = clock
        self.policy = policy
        self.connect_url = connect_url
        self.near_expiry = near_expiry
        self.refresh_fraction = refresh_fraction
        self.touch_interval = touch_interval
        # The lease fence (broker.lease): its TTL, how long after taking it a
        # token may still be presented, and how often a waiting flight looks.
        self.lease_seconds = lease_seconds
        self.lease_margin = lease_margin
        self.lease_poll = lease_poll
        self._monotonic = monotonic
        self._sleep = sleep
        # Told the server name whenever a rotation is found lost (for metrics).
        self.on_rotation_lost: Callable[[str], None] | None = None
        # Per-credential backoff after a failed renewal (``_renewal_failed``).
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.rand = rand

    # -- public ----------------------------------------------------------------

    def resolve(self, user_id: str, server_name: str, *, request_id: str | None = None,
                method: str | None = None, url: str | None = None, dpop_nonce: str | None = None) -> Resolved:
        """The header for (user, server) now, or a BrokerError saying why not.

        ``method`` and ``url`` name the upstream request: a DPoP server's
        answer then carries a proof bound to them and to the token."""
        server = self.servers.get_server(server_name)
        try:
            acquisition = self.acquire(user_id, server_name)
        except BrokerError as exc:
            record_failure(self.audit, self.clock, user_id, server, exc, request_id)
            raise
        return finish(self.policy, self.audit, self.clock, user_id, server, acquisition, request_id,
                      method=method, url=url, dpop_nonce=dpop_nonce)

    def acquire(self, user_id: str, server_name: str, *, owner: str | None = None) -> Acquisition:
        """Steps 1-5 of the ordering, without policy or audit (the flight's work;
        each caller then runs policy and audit on its own call). ``owner`` names
        this execution in the row's lease (see ``broker.lease``)."""
        server = self.servers.get_server(server_name)
        result = self._acquire(user_id, server, self.clock.now(), owner or local_owner())
        return Acquisition(result.credential, result.action, result.outcome, result.reason)

    def renew_if_due(self, user_id: str, server_name: str, *, trigger: str = "proactive",
                     owner: str | None = None) -> Acquisition | None:
        """Proactive refresh: renew only if the refresh point has passed.

        Re-reads the store first, so a refresh another flight already made is
        never repeated; a credential backing off is left alone; an idle refresh
        token past its keep-alive point is exercised even if the access token
        is not due. No policy runs: nothing is handed to a caller.
        """
        server = self.servers.get_server(server_name)
        now = self.clock.now()
        stored = self.store.get(user_id, server.key)
        if stored is None or stored.status is CredentialStatus.NEEDS_RECONNECT:
            return None
        if _backing_off(stored, now):
            return None if stored.credential.is_expired(now) else Acquisition(stored.credential, Action.INJECT)
        if not self._due(stored.credential, now):
            if stored.keepalive_at is None or now < stored.keepalive_at:
                return Acquisition(stored.credential, Action.INJECT)
            trigger = "keepalive"  # exercise the idle refresh token before it dies of disuse
        try:
            result = self._renew(user_id, server, stored, now, owner=owner or local_owner())
        except BrokerError as exc:
            self._record(Action.REFRESH, Outcome.FAILURE, user_id, server, _method(server), _reason(exc), None)
            return None
        self._record(Action.REFRESH, result.outcome, user_id, server, _method(server),
                     result.reason or trigger, None)
        return Acquisition(result.credential, result.action, result.outcome, result.reason)

    # -- ordering ----------------------------------------------------------------

    def _acquire(self, user_id: str, server: ServerConfig, now: datetime, owner: str) -> _Outcome:
        stored = self.store.get(user_id, server.key)
        if stored is not None:
            cred = stored.credential
            if stored.status is CredentialStatus.NEEDS_RECONNECT:
                if not cred.is_expired(now):
                    self._touch(stored, now)
                    return _Outcome(cred, Action.INJECT, Outcome.STALE, "needs_reconnect")
                if server.mode is Mode.OAUTH_CONNECT:
                    raise self._not_connected(user_id, server, NotConnected.RECONNECT_REQUIRED)
                return self._used(user_id, server, now, self._renew(user_id, server, stored, now, used=True,
                                                                    owner=owner, action=Action.ACQUIRE))
            if not self._due(cred, now) and not unbound(server, cred):
                self._touch(stored, now)
                return _Outcome(cred, Action.INJECT)
            if _backing_off(stored, now):
                # The last renewal failed and its next attempt is not yet due.
                if not cred.is_expired(now):
                    self._touch(stored, now)
                    return _Outcome(cred, Action.INJECT, Outcome.STALE, stored.failure or "backoff")
                if stored.next_attempt_at == UNTIL_SUBJECT_CHANGES:
                    raise _refused_until_subject_changes(stored)
            return self._used(user_id, server, now, self._renew(user_id, server, stored, now, used=True, owner=owner))
        if server.mode is Mode.OAUTH_CONNECT:
            raise self._not_connected(user_id, server, NotConnected.NEVER_CONNECTED)
        return self._used(user_id, server, now, self._mint(user_id, server, now, used=True))

    def _used(self, user_id: str, server: ServerConfig, now: datetime, result: _Outcome) -> _Outcome:
        # A caller used this credential: proactive refresh should keep it warm.
        # A renewal we stored already carried the use in the same write.
        if not result.written:
            self.store.touch(user_id, server.key, now)
        return result

    def _renew(self, user_id: str, server: ServerConfig, stored: StoredCredential, now: datetime,
               used: bool = False, owner: str = "", action: Action = Action.REFRESH) -> _Outcome:
        """Renew an existing row under its lease: refresh grant (oauth_connect) or
        a new exchange of the subject token (``action`` ACQUIRE after reconnect)."""
        owner = owner or local_owner()
        if server.mode is Mode.OAUTH_CONNECT and stored.credential.refresh_token is None:
            if not stored.credential.is_expired(now):
                if stored.next_attempt_at is None:
                    # Nothing to try before it expires: out of the beat's scan till then.
                    self.store.record_failure(user_id, server.key, expected_version=stored.version,
                                              failure="no_refresh_token", failure_count=stored.failure_count,
                                              next_attempt_at=stored.credential.expires_at)
                return _Outcome(stored.credential, Action.REFRESH, Outcome.STALE, "no_refresh_token")
            # Expired with nothing to renew it: only the user can help (and the
            # beat stops looking at it).
            self.store.record_failure(user_id, server.key, expected_version=stored.version,
                                      failure="no_refresh_token", failure_count=stored.failure_count,
                                      next_attempt_at=None, status=CredentialStatus.NEEDS_RECONNECT)
            raise self._not_connected(user_id, server, NotConnected.RECONNECT_REQUIRED)
        taken = self._take_lease(user_id, server, stored, now, owner, action)
        if isinstance(taken, _Outcome):
            return taken
        take, taken_at = taken
        assert take.current is not None
        stored, cred = take.current, take.current.credential
        released = False
        try:
            try:
                if self._monotonic() - taken_at > self.lease_margin:
                    # Paused between taking the lease and presenting: the lease may be
                    # about to expire under a call that could last its whole length.
                    raise ServiceUnavailable("this flight's lease is too old to present a token; retry")
                if server.mode is Mode.OAUTH_CONNECT:
                    if cred.refresh_token is None:
                        raise self._not_connected(user_id, server, NotConnected.RECONNECT_REQUIRED)
                    # While the credential is valid a failure costs nobody anything: one
                    # attempt, and the credential's backoff schedules the next.
                    new = self.oauth.refresh(server, cred, retry=cred.is_expired(now))
                else:
                    new = self.oauth.mint(server, self._subject_token(user_id, now), retry=cred.is_expired(now))
            except NotConnected:
                raise
            except (UpstreamError, SubjectTokenMissing) as exc:
                if isinstance(exc, UpstreamOutcomeUnknown) and server.mode is Mode.OAUTH_CONNECT:
                    # The provider may have rotated the token: leave the lease
                    # expired, not released, so the next flight knows the outcome
                    # is unknown (and reports rotation_lost if it was spent).
                    released = self._abandon_lease(user_id, server, owner)
                if action is Action.ACQUIRE:
                    raise
                return self._renewal_failed(user_id, server, stored, now, exc, took_over=take.took_over)
            written = self.store.compare_and_swap(user_id, server.key, stored.version, new,
                                                  last_used_at=now if used else None, lease_owner=owner)
            released = written is not None
            if written is None:
                return self._unstored(user_id, server, now, new, action)
            return _Outcome(new, action, written=used)
        finally:
            if not released:
                self._release_lease(user_id, server, owner)

    def _take_lease(self, user_id: str, server: ServerConfig, stored: StoredCredential, now: datetime,
                    owner: str, action: Action) -> tuple[LeaseTake, float] | _Outcome:
        """Take the row's lease, or say what to serve instead: the row renewed by
        another flight meanwhile, or (lease held elsewhere) its still-valid
        credential. With an expired credential, wait for the holder, boundedly."""
        deadline = self._monotonic() + self.lease_seconds + 1.0
        elsewhere = "refreshed_elsewhere" if action is Action.REFRESH else "minted_elsewhere"
        read_version = stored.version
        while True:
            if stored.status is CredentialStatus.NEEDS_RECONNECT and server.mode is Mode.OAUTH_CONNECT:
                if not stored.credential.is_expired(now):
                    return _Outcome(stored.credential, Action.INJECT, Outcome.STALE, "needs_reconnect")
                raise self._not_connected(user_id, server, NotConnected.RECONNECT_REQUIRED)
            if stored.version != read_version and not self._due(stored.credential, now) \
                    and stored.status is not CredentialStatus.NEEDS_RECONNECT:
                return _Outcome(stored.credential, action, Outcome.SUCCESS, elsewhere)
            taken_at = self._monotonic()
            take = self.store.take_lease(stored, owner, self.lease_seconds)
            if take.taken:
                if take.took_over:
                    log.warning("lease on server %s expired without release: previous flight's outcome unknown",
                                server.name)
                return take, taken_at
            current = take.current
            if current is not None and current.version == stored.version \
                    and current.lease_owner == stored.lease_owner:
                # Held by a live flight: serve what is still valid, else wait for it.
                if not current.credential.is_expired(now):
                    return _Outcome(current.credential, Action.INJECT, Outcome.SUCCESS, "renewal_in_progress")
                if self._monotonic() >= deadline:
                    raise ServiceUnavailable("another flight is renewing this credential; retry")
                self._sleep(self.lease_poll)
                current = self.store.get(user_id, server.key)
            if current is None:
                if server.mode is Mode.OAUTH_CONNECT:
                    raise self._not_connected(user_id, server, NotConnected.NEVER_CONNECTED)
                return self._mint(user_id, server, now, used=False)
            stored = current

    def _unstored(self, user_id: str, server: ServerConfig, now: datetime, new: Credential,
                  action: Action) -> _Outcome:
        """Our write failed (the lease was taken over, or the row replaced or deleted)."""
        current = self.store.get(user_id, server.key)
        if current is None and server.mode is Mode.OAUTH_CONNECT:
            # Disconnected while we refreshed: the user revoked consent, so
            # the fresh credential must not be served or stored.
            log.warning("credential for server %s was deleted during its refresh; not stored", server.name)
            raise self._not_connected(user_id, server, NotConnected.NEVER_CONNECTED)
        if current is not None and current.status is not CredentialStatus.NEEDS_RECONNECT \
                and not self._due(current.credential, now):
            reason = "refreshed_elsewhere" if action is Action.REFRESH else "minted_elsewhere"
            return _Outcome(current.credential, action, Outcome.SUCCESS, reason)
        if server.mode is Mode.OAUTH_CONNECT:
            # A rotated credential is served only once stored: handing out a token
            # whose refresh token the store never learnt strands the user.
            log.warning("refresh for server %s could not be stored (lease lost); not served", server.name)
            raise ServiceUnavailable("the renewed credential could not be stored; retry")
        # An exchange rotates nothing: the minted token is good whoever stores it.
        return _Outcome(new, action)

    def _abandon_lease(self, user_id: str, server: ServerConfig, owner: str) -> bool:
        try:
            return self.store.expire_lease(user_id, server.key, owner)
        except BrokerError as exc:
            log.warning("could not mark the lease for server %s: %s", server.name, exc.code)
            return True  # leave it as it is: it expires by itself, unreleased

    def _release_lease(self, user_id: str, server: ServerConfig, owner: str) -> None:
        try:
            self.store.release_lease(user_id, server.key, owner)
        except BrokerError as exc:
            # The lease will expire: the next flight then treats our outcome as unknown.
            log.warning("could not release the lease for server %s: %s", server.name, exc.code)

    def _renewal_failed(self, user_id: str, server: ServerConfig, stored: StoredCredential, now: datetime,
                        exc: BrokerError, took_over: bool = False) -> _Outcome:
        """Record the failure and when to try again; serve the credential while valid.

        Permanent on a refresh: ``needs_reconnect``, never retried. Permanent on
        a mint: not retried until the subject token changes. Transient: the
        next attempt after exponential backoff with jitter, at least the
        server's ``Retry-After``, for the beat and for resolves alike.
        """
        cred = stored.credential
        reason = _reason(exc)
        valid = not cred.is_expired(now)
        failures = stored.failure_count + 1
        permanent = classify(exc) is FailureClass.PERMANENT
        if permanent and server.mode is Mode.OAUTH_CONNECT:
            # Another flight may have rotated the refresh token already: re-read first.
            current = self.store.get(user_id, server.key)
            if current is not None and current.version != stored.version and not self._due(current.credential, now):
                return _Outcome(current.credential, Action.REFRESH, Outcome.SUCCESS, "refreshed_elsewhere")
            failure = reason
            if took_over and reason == "invalid_grant":
                # The flight whose lease expired did present this token: its
                # response, and so the rotated token, is lost.
                failure = ROTATION_LOST
                log.warning("rotation lost for server %s: the refresh token was spent by a flight "
                            "whose outcome is unknown", server.name)
                self._record(Action.REFRESH, Outcome.FAILURE, user_id, server, _method(server), ROTATION_LOST, None)
                if self.on_rotation_lost is not None:
                    self.on_rotation_lost(server.name)
            self.store.record_failure(user_id, server.key, expected_version=stored.version, failure=failure,
                                      failure_count=failures, next_attempt_at=None,
                                      status=CredentialStatus.NEEDS_RECONNECT)
            if valid:
                return _Outcome(cred, Action.REFRESH, Outcome.STALE, failure)
            raise self._not_connected(user_id, server, NotConnected.RECONNECT_REQUIRED)
        if permanent:
            next_at = UNTIL_SUBJECT_CHANGES
        else:
            retry_after = exc.retry_after if isinstance(exc, UpstreamError) else None
            delay = next_attempt_delay(failures, retry_after=retry_after, base=self.backoff_seconds,
                                       cap=self.backoff_max_seconds, rand=self.rand)
            # From the answer, not the flight's start: Retry-After counts from the response.
            next_at = self.clock.now() + timedelta(seconds=delay)
        self.store.record_failure(user_id, server.key, expected_version=stored.version, failure=reason,
                                  failure_count=failures, next_attempt_at=next_at,
                                  status=CredentialStatus.DEGRADED if valid else None)
        if valid:
            return _Outcome(cred, Action.REFRESH, Outcome.STALE, reason)
        raise exc

    def _mint(self, user_id: str, server: ServerConfig, now: datetime, used: bool = False) -> _Outcome:
        """First mint, no row yet: no lease (an exchange rotates nothing); the
        insert is the compare-and-swap, and a loser serves the winner's record."""
        subject = self._subject_token(user_id, now)
        new = self.oauth.mint(server, subject)
        written = self.store.compare_and_swap(user_id, server.key, None, new, last_used_at=now if used else None)
        if written is None:
            current = self.store.get(user_id, server.key)
            if current is not None and not self._due(current.credential, now):
                return _Outcome(current.credential, Action.ACQUIRE, Outcome.SUCCESS, "minted_elsewhere")
        return _Outcome(new, Action.ACQUIRE, written=written is not None and used)

    # -- helpers -------------------------------------------------------------------

    def _subject_token(self, user_id: str, now: datetime) -> Secret:
        subject = self.store.get_subject_token(user_id)
        if subject is None or subject.is_expired(now):
            raise SubjectTokenMissing()
        return subject.token

    def _due(self, cred: Credential, now: datetime) -> bool:
        point = refresh_point(cred.issued_at, cred.expires_at, self.near_expiry, self.refresh_fraction)
        return point is not None and now >= point

    def _touch(self, stored: StoredCredential, now: datetime) -> None:
        if stored.last_used_at is None or now - stored.last_used_at >= self.touch_interval:
            self.store.touch(stored.user_id, stored.server_key, now)

    def _not_connected(self, user_id: str, server: ServerConfig, reason: str) -> NotConnected:
        url = None
        if self.connect_url is not None:
            try:
                url = self.connect_url(user_id, server.name)
            except BrokerError as exc:
                log.warning("could not start a connect flow for server %s: %s", server.name, exc.code)
        return NotConnected(reason=reason, connect_url=url)

    def _record(self, action: Action, outcome: Outcome, user_id: str, server: ServerConfig, method: str,
                reason: str | None, request_id: str | None) -> None:
        _record(self.audit, self.clock, action, outcome, user_id, server, method, reason, request_id)


def finish(policy: Policy, audit: AuditSink, clock: Clock, user_id: str, server: ServerConfig,
           acquisition: Acquisition, request_id: str | None, *, method: str | None = None,
           url: str | None = None, dpop_nonce: str | None = None) -> Resolved:
    """Policy, then audit, for one caller's resolve; the same in worker and client."""
    cred = acquisition.credential
    audit_method = _method(server)
    try:
        enforce(policy, PolicyInput(user_id, server.name, server.key, cred.scopes, cred.audience,
                                    cred.expires_at, cred.obtained_via.value))
        resolved = resolved_from(server, cred, method=method, url=url, dpop_nonce=dpop_nonce)
    except BrokerError as exc:
        outcome = Outcome.DENIED if exc.code == "policy_denied" else Outcome.FAILURE
        _record(audit, clock, acquisition.action, outcome, user_id, server, audit_method, exc.code, request_id)
        raise
    _record(audit, clock, acquisition.action, acquisition.outcome, user_id, server, audit_method,
            acquisition.reason, request_id)
    return resolved


def record_failure(audit: AuditSink, clock: Clock, user_id: str, server: ServerConfig, exc: BrokerError,
                   request_id: str | None) -> None:
    action = Action.CONNECT if isinstance(exc, NotConnected) else Action.ACQUIRE
    _record(audit, clock, action, Outcome.FAILURE, user_id, server, _method(server), _reason(exc), request_id)


def _record(audit: AuditSink, clock: Clock, action: Action, outcome: Outcome, user_id: str, server: ServerConfig,
            method: str, reason: str | None, request_id: str | None) -> None:
    record_event(audit, clock.now(), action, outcome, user_id=user_id, server=server.name, method=method,
                 reason=reason, request_id=request_id)


def _backing_off(stored: StoredCredential, now: datetime) -> bool:
    """A renewal failed and its next attempt is not due yet."""
    return stored.next_attempt_at is not None and now < stored.next_attempt_at


def _refused_until_subject_changes(stored: StoredCredential) -> BrokerError:
    """The recorded permanent mint failure, raised again without asking anyone."""
    if stored.failure == SubjectTokenMissing.code:
        return SubjectTokenMissing()
    code = stored.failure if stored.failure in OAUTH_ERROR_CODES else None
    return UpstreamError("the authorization server refused this user's subject token; "
                         "not asked again until the subject token changes", oauth_error=code)


def _method(server: ServerConfig) -> str:
    return "connect" if server.mode is Mode.OAUTH_CONNECT else server.mode.value


def _reason(exc: BrokerError) -> str:
    if isinstance(exc, UpstreamError) and exc.oauth_error:
        return exc.oauth_error
    if isinstance(exc, NotConnected):
        return exc.reason
    return exc.code
