"""What the sync and async clients share: every step of a resolve but the I/O.

``BrokerClient`` (threads, redis-py) and ``AsyncBrokerClient`` (asyncio,
``redis.asyncio``) differ only in how they talk to Redis and Celery. Settings,
request checks, opening the sealed cache and flight envelopes, reading a
flight's outcome, mapping transport failures to ``broker.errors``, and the
policy/audit/use-mark finish live here once, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import redis
from kombu.exceptions import OperationalError as KombuOperationalError

from broker.clock import Clock, SystemClock
from broker.crypto import DecryptError, Keyring, Sealer, parse_key, parse_master_keys
from broker.errors import BrokerError, NotConnected, ResolveTimeout, ServiceUnavailable, StoreDisabled, error_from_dict
from broker.models import refresh_point
from broker.policy import Policy, load_policy
from broker.resolved import check_nonce, check_request_target, unbound
from broker.resolver import Acquisition, Resolved, finish, record_failure
from broker.servers import ServerConfig, ServerRegistry, servers_from_settings
from broker.settings import Settings, load_settings
from broker.validation import validate_server_name, validate_user_id

from .celery.app import make_celery
from .common.auditstream import StreamAuditSink
from .common.deadline import DeadlinePassed
from .common.embedded import session_environment
from .common.metrics import METRICS
from .common.outcomes import flight_result
from .common.wire import connect_url_purpose, from_envelope, open_envelope, result_purpose

__all__ = ["ClientBase", "ClientCore", "Tally", "client_settings", "client_policy", "parse_meta", "claim_ttl_ms", "warm_outcome",
           "transport_failure", "TRANSPORT_ERRORS", "MAX_FLIGHT_RETRIES", "RECLAIM_PAUSE", "DIAGNOSE_SECONDS",
           "RETRY"]

MAX_FLIGHT_RETRIES = 5
# Pause before claiming again when a flight was released under our feet.
RECLAIM_PAUSE = 0.01
# How long a client's claim outlives its caller's deadline.
_CLAIM_MARGIN_MS = 2000
# The one look at Redis that explains a timeout may overrun the deadline by this.
DIAGNOSE_SECONDS = 0.1
# What a failing Redis or broker connection raises (redis.asyncio raises the same classes).
TRANSPORT_ERRORS = (redis.RedisError, KombuOperationalError, OSError)
# ``ClientCore.read_flight``'s answer when the caller should free the pair and fly again.
RETRY = None


def client_settings(settings: Settings | None, environ: Mapping[str, str] | None, *, redis_url: str | None,
                    transport_key: str | bytes | None, master_keys: str | None,
                    timeout: float | None) -> Settings:
    """``CREDBROKER_*`` (beside a running ``credbroker up``, its session.env too),
    then explicit arguments over them."""
    s = settings or load_settings(session_environment() if environ is None else environ)
    changes: dict[str, Any] = {}
    if redis_url is not None:
        changes["redis_url"] = redis_url
    if transport_key is not None:
        changes["transport_key"] = (
            transport_key if isinstance(transport_key, bytes) else parse_key(transport_key, "transport_key")
        )
    if master_keys is not None:
        changes["keyring"] = Keyring.from_mapping(parse_master_keys(master_keys, "master_keys"))
    if timeout is not None:
        changes["resolve_timeout"] = float(timeout)
    return dataclasses.replace(s, **changes) if changes else s


def client_policy(policy: Policy | str | None, settings: Settings) -> Policy:
    if policy is None and settings.policy:
        return load_policy(settings.policy)
    return load_policy(policy) if isinstance(policy, str) or policy is None else policy


def parse_meta(raw: bytes | str | None) -> dict[str, Any] | None:
    """A stored Celery result meta, or None (absent or unreadable)."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def claim_ttl_ms(deadline: float) -> int:
    """A claim outlives its caller by a little: a task that has not started by
    then (Redis stalled, workers busy) loses the pair to the next caller instead
    of leaving joiners waiting on nothing."""
    return int(max(0.0, deadline - time.monotonic()) * 1000) + _CLAIM_MARGIN_MS


def warm_outcome(meta: dict[str, Any] | None) -> list[str]:
    """The servers a warm task queued, or its error raised."""
    if meta is None:
        raise ResolveTimeout()
    result = meta.get("result") if meta.get("status") == "SUCCESS" else None
    if not isinstance(result, dict):
        raise ServiceUnavailable("the warm request failed; check the workers")
    if "error" in result:
        raise error_from_dict(result["error"])
    return [str(s) for s in result.get("queued", [])]


def transport_failure(exc: BaseException, deadline: float) -> tuple[BrokerError, bool]:
    """A flight's failure as the caller sees it, and whether a look at Redis
    should explain it (a timeout may mean no worker runs)."""
    if isinstance(exc, BrokerError):
        return exc, isinstance(exc, ResolveTimeout)
    if isinstance(exc, DeadlinePassed):
        # The next Redis call fell after the deadline (typically the last
        # liveness check of a wait): the caller's time is up, not Redis.
        return ResolveTimeout(), True
    # Redis stalled or failed; past the deadline, that is the caller's timeout.
    return (ResolveTimeout() if time.monotonic() >= deadline else ServiceUnavailable("Redis unavailable")), False


class ClientCore:
    """A client's configuration and its pure steps (no Redis, no Celery)."""

    def __init__(self, settings: Settings, servers: ServerRegistry | None, policy: Policy | str | None,
                 clock: Clock | None) -> None:
        self.settings = settings
        self.servers = servers if servers is not None else servers_from_settings(settings)
        self.sealer: Sealer | None = settings.sealer()
        self.clock = clock or SystemClock()
        self.policy = client_policy(policy, settings)
        # This client's deployment, which need not be its process's (a test or a
        # gateway may talk to several): every name it builds says it explicitly.
        self.namespace = settings.namespace
        # The fingerprint lets a worker of another configuration refuse a flight.
        self.config = self.servers.fingerprint
        self.near = timedelta(seconds=settings.near_expiry_seconds)
        self.fraction = settings.refresh_fraction

    def deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout if timeout is not None else self.settings.resolve_timeout)

    def check(self, user_id: str, server: str, method: str | None, url: str | None,
              dpop_nonce: str | None) -> ServerConfig:
        """The request's checks, before any I/O; returns the server's configuration."""
        validate_user_id(user_id)
        validate_server_name(server)
        if method is not None or url is not None:
            check_request_target(method or "", url or "")
        check_nonce(dpop_nonce)
        srv = self.servers.get_server(server)
        if self.sealer is None:
            raise StoreDisabled("no transport key: set CREDBROKER_TRANSPORT_KEY or CREDBROKER_MASTER_KEYS")
        return srv

    def warm_servers(self, user_id: str, servers: list[str] | None) -> list[str] | None:
        validate_user_id(user_id)
        if servers is None:
            return None
        return [self.servers.get_server(validate_server_name(s)).name for s in servers]

    def from_cache(self, blob: bytes | str | None, key: str, user_id: str,
                   server: ServerConfig) -> Acquisition | None:
        """The cached copy if it may be served as it is; None: take the flight."""
        assert self.sealer is not None
        if blob is None:
            return None
        try:
            acq = from_envelope(open_envelope(self.sealer, blob, key), user_id, server.key)
        except (DecryptError, ValueError, KeyError):
            return None  # sealed under an older transport key, or corrupt: take the flight
        cred = acq.credential
        if cred.expires_at is not None and self.clock.now() >= cred.expires_at - self.near:
            return None  # near expiry: take the flight, which renews
        if unbound(server, cred):
            return None  # cached before dpop was turned on: the flight renews it with a key
        return acq  # the cached copy is already classified as an inject

    def flight_error(self, result: dict[str, Any], task_id: str) -> BrokerError:
        """The flight's error, with its connect URL unsealed (it holds a live state)."""
        exc = error_from_dict(result["error"])
        sealed = result.get("connect_url_sealed")
        if isinstance(exc, NotConnected) and isinstance(sealed, str) and self.sealer is not None:
            try:
                exc.connect_url = self.sealer.open(sealed, connect_url_purpose(task_id)).decode()
            except DecryptError:
                exc.connect_url = None
        return exc

    def due(self, acq: Acquisition) -> bool:
        """Past its refresh point, so a resolve of our own should renew it."""
        cred = acq.credential
        point = refresh_point(cred.issued_at, cred.expires_at, self.near, self.fraction)
        return point is not None and self.clock.now() >= point

    def read_flight(self, meta: dict[str, Any], task_id: str, joined: bool, finished_before: bool,
                    user_id: str, server: ServerConfig) -> Acquisition | None:
        """A finished flight's answer for this caller: its credential, its error
        raised, or ``RETRY`` (None) when the caller should free the pair and fly."""
        assert self.sealer is not None
        result = flight_result(meta)
        if not isinstance(result, dict) or result.get("superseded"):
            return RETRY
        # A joined flight that had finished before we arrived holds a claim
        # its worker never released (it died after storing the result): that
        # result did not answer this call.
        stale_join = joined and finished_before
        if "error" in result:
            if result.get("trigger") in ("refresh", "warm") or stale_join:
                return RETRY  # a background refresh failed, or an old answer: fly ourselves
            raise self.flight_error(result, task_id)
        try:
            acq = from_envelope(open_envelope(self.sealer, result["ok"], result_purpose(task_id)),
                                user_id, server.key)
        except (DecryptError, ValueError, KeyError):
            raise BrokerError("flight result could not be opened: check that "
                              "CREDBROKER_TRANSPORT_KEY matches the workers'") from None
        if stale_join and self.due(acq):
            return RETRY
        return acq

    def finish(self, audit: StreamAuditSink, user_id: str, server: ServerConfig, acq: Acquisition,
               request_id: str | None, method: str | None, url: str | None, dpop_nonce: str | None) -> Resolved:
        """Policy, audit and the use mark, all buffered (no I/O on this path)."""
        resolved = finish(self.policy, audit, self.clock, user_id, server, acq, request_id,
                          method=method, url=url, dpop_nonce=dpop_nonce)
        audit.mark_used(user_id, server.key)
        return resolved

    def failed(self, audit: StreamAuditSink, user_id: str, server: ServerConfig, failure: BrokerError,
               request_id: str | None) -> None:
        record_failure(audit, self.clock, user_id, server, failure, request_id)

    @staticmethod
    def count(outcome: str, path: str, started: float | None = None) -> None:
        METRICS.inc("credbroker_resolves_total", outcome=outcome, path=path)
        if started is not None:
            METRICS.observe("credbroker_resolve_seconds", time.perf_counter() - started, path=path)


class Tally:
    """Counts one resolve in the metrics as it ends: its outcome and path
    (``fast`` until the caller sets ``path = "flight"``)."""

    def __init__(self) -> None:
        self.path = "fast"
        self.started = time.perf_counter()

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            ClientCore.count("ok", self.path, self.started)
        elif isinstance(exc, BrokerError):
            ClientCore.count(exc.code, self.path)


class ClientBase:
    """The constructor both clients share. Reads the ``CREDBROKER_*`` settings;
    explicit arguments override them. A gateway needs ``REDIS_URL``,
    ``SERVERS_FILE`` and ``TRANSPORT_KEY`` (or the master keys, from which the
    transport key is derived) — never the database. ``connection`` and
    ``audit``: a Redis client and audit sink the process already has (the API
    shares its own); each client's ``_open`` says which kind it takes."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        servers: ServerRegistry | None = None,
        transport_key: str | bytes | None = None,
        master_keys: str | None = None,
        policy: Policy | str | None = None,
        timeout: float | None = None,
        settings: Settings | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        connection: Any = None,
        audit: StreamAuditSink | None = None,
    ) -> None:
        self.core = ClientCore(client_settings(settings, environ, redis_url=redis_url, transport_key=transport_key,
                                               master_keys=master_keys, timeout=timeout), servers, policy, clock)
        self.settings = self.core.settings
        self.servers = self.core.servers
        self.sealer = self.core.sealer
        self.clock = self.core.clock
        self._ns = self.core.namespace
        self._owns_connection = connection is None
        self._owns_audit = audit is None
        self.celery = make_celery(self.settings)
        self._open(connection, audit)

    def _open(self, connection: Any, audit: StreamAuditSink | None) -> None:
        raise NotImplementedError

    @property
    def policy(self) -> Policy:
        return self.core.policy

    @policy.setter
    def policy(self, value: Policy) -> None:
        self.core.policy = value
