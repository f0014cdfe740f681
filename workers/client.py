"""BrokerClient: what upstream services call to get the header to inject.

Fast path: one Redis GET of the sealed credential, cached until it is near
expiry (the beat renews it from its refresh point on). Miss or near expiry: join or start the (user, server) flight
and wait for its sealed result. Policy and audit run on every call, here, in
the caller's process. Safe to share across threads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import redis
from kombu.exceptions import OperationalError as KombuOperationalError

from broker.clock import Clock, SystemClock
from broker.crypto import DecryptError, Sealer, parse_key, parse_master_keys, Keyring
from broker.errors import BrokerError, NotConnected, ResolveTimeout, ServiceUnavailable, StoreDisabled, error_from_dict
from broker.models import refresh_point
from broker.policy import Policy, load_policy
from broker.resolved import check_nonce, check_request_target, unbound
from broker.resolver import Acquisition, Resolved, finish, record_failure
from broker.servers import ServerConfig, ServerRegistry, servers_from_settings
from broker.settings import Settings, load_settings
from broker.validation import validate_server_name, validate_user_id

from .auditstream import StreamAuditSink
from .celery_app import TASK_RESOLVE, make_celery
from .constants import RESULT_CHANNEL_PREFIX, cache_key, flight_key
from .diagnose import explain_timeout
from .embedded import session_environment
from .flight import Claims, ResultWaiter, new_task_id
from .metrics import METRICS
from .outcomes import flight_result
from .runtime import redis_client
from .wire import connect_url_purpose, from_envelope, open_envelope, result_purpose

__all__ = ["BrokerClient", "Resolved"]

log = logging.getLogger(__name__)
_MAX_FLIGHT_RETRIES = 5
# Pause before claiming again when a flight was released under our feet.
_RECLAIM_PAUSE = 0.01


class BrokerClient:
    """Resolves per-user credentials through the broker's workers.

    Reads the ``CREDBROKER_*`` settings; explicit arguments override them. A
    gateway needs ``REDIS_URL``, ``SERVERS_FILE`` and ``TRANSPORT_KEY`` (or the
    master keys, from which the transport key is derived) — never the
    database.
    """

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
        connection: redis.Redis | None = None,
        audit: StreamAuditSink | None = None,
    ) -> None:
        # Beside a running `credbroker up` (its .credbroker/session.env), its settings apply here too.
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
        self.settings = dataclasses.replace(s, **changes) if changes else s
        self.servers = servers if servers is not None else servers_from_settings(self.settings)
        self.sealer: Sealer | None = self.settings.sealer()
        self.clock = clock or SystemClock()
        self.policy: Policy = load_policy(policy) if isinstance(policy, str) or policy is None else policy
        if policy is None and self.settings.policy:
            self.policy = load_policy(self.settings.policy)
        # A process that already has a Redis pool and audit sink (the API) shares them.
        self._owns_connection = connection is None
        self.redis = connection if connection is not None else redis_client(self.settings)
        self.claims = Claims(self.redis)
        self.celery = make_celery(self.settings)
        self.waiter = ResultWaiter(self.redis, self._meta)
        self._owns_audit = audit is None
        self.audit = audit if audit is not None else StreamAuditSink(self.redis)
        self._near = timedelta(seconds=self.settings.near_expiry_seconds)
        self._fraction = self.settings.refresh_fraction

    # -- public --------------------------------------------------------------

    def resolve(self, user_id: str, server: str, timeout: float | None = None,
                request_id: str | None = None, *, method: str | None = None,
                url: str | None = None, dpop_nonce: str | None = None) -> Resolved:
        """The header to inject for (user, server) now; raises ``broker.errors``.

        For a DPoP server, ``method`` and ``url`` (the upstream request) add a
        fresh proof, signed here in the caller's process; ``Resolved.apply``
        sets both headers and ``Resolved.dpop_proof`` mints more. ``dpop_nonce``:
        the resource server's latest ``DPoP-Nonce``, put in the proof."""
        started = time.perf_counter()
        path = "fast"
        try:
            validate_user_id(user_id)
            validate_server_name(server)
            if method is not None or url is not None:
                check_request_target(method or "", url or "")
            check_nonce(dpop_nonce)
            srv = self.servers.get_server(server)
            if self.sealer is None:
                raise StoreDisabled("no transport key: set CREDBROKER_TRANSPORT_KEY or CREDBROKER_MASTER_KEYS")
            acq = self._from_cache(user_id, srv)
            if acq is None:
                path = "flight"
                deadline = time.monotonic() + (timeout if timeout is not None else self.settings.resolve_timeout)
                acq = self._from_flight(user_id, srv, deadline, request_id)
            resolved = finish(self.policy, self.audit, self.clock, user_id, srv, acq, request_id,
                              method=method, url=url, dpop_nonce=dpop_nonce)
            self.audit.mark_used(user_id, srv.key)
        except BrokerError as exc:
            METRICS.inc("credbroker_resolves_total", outcome=exc.code, path=path)
            raise
        METRICS.inc("credbroker_resolves_total", outcome="ok", path=path)
        METRICS.observe("credbroker_resolve_seconds", time.perf_counter() - started, path=path)
        return resolved

    def warm(self, user_id: str, servers: list[str] | None = None, timeout: float | None = None) -> list[str]:
        """Warm the user's credentials (every configured server, or ``servers``)
        and return the servers queued; returns once the flights are started, not
        finished. Skipped servers (never connected, no subject token, policy)
        are left out; ``POST /v1/warm`` also says why."""
        from .celery_app import TASK_WARM_USER

        validate_user_id(user_id)
        if servers is not None:
            servers = [self.servers.get_server(validate_server_name(s)).name for s in servers]
        task_id = new_task_id()
        deadline = time.monotonic() + (timeout if timeout is not None else self.settings.resolve_timeout)
        try:
            self.celery.send_task(TASK_WARM_USER, args=[user_id, servers], task_id=task_id)
            meta = self.waiter.wait(task_id, deadline, lambda: True)
        except (redis.RedisError, KombuOperationalError, OSError):
            raise ServiceUnavailable("Redis unavailable") from None
        if meta is None:
            raise ResolveTimeout()
        result = meta.get("result") if meta.get("status") == "SUCCESS" else None
        if not isinstance(result, dict):
            raise ServiceUnavailable("the warm request failed; check the workers")
        if "error" in result:
            raise error_from_dict(result["error"])
        return [str(s) for s in result.get("queued", [])]

    def close(self) -> None:
        self.waiter.close()
        if self._owns_audit:
            self.audit.close()
        self.celery.close()
        if self._owns_connection:
            self.redis.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fast path -------------------------------------------------------------

    def _from_cache(self, user_id: str, server: ServerConfig) -> Acquisition | None:
        assert self.sealer is not None
        key = cache_key(user_id, server.key)
        try:
            blob = self.redis.get(key)
        except redis.RedisError:
            raise ServiceUnavailable("Redis unavailable") from None
        if blob is None:
            return None
        try:
            acq = from_envelope(open_envelope(self.sealer, blob, key), user_id, server.key)
        except (DecryptError, ValueError, KeyError):
            return None  # sealed under an older transport key, or corrupt: take the flight
        cred = acq.credential
        if cred.expires_at is not None and self.clock.now() >= cred.expires_at - self._near:
            return None  # near expiry: take the flight, which renews
        if unbound(server, cred):
            return None  # cached before dpop was turned on: the flight renews it with a key
        return acq  # the cached copy is already classified as an inject

    # -- flight ------------------------------------------------------------------

    def _flight_error(self, result: dict[str, Any], task_id: str) -> BrokerError:
        """The flight's error, with its connect URL unsealed (it holds a live state)."""
        exc = error_from_dict(result["error"])
        sealed = result.get("connect_url_sealed")
        if isinstance(exc, NotConnected) and isinstance(sealed, str) and self.sealer is not None:
            try:
                exc.connect_url = self.sealer.open(sealed, connect_url_purpose(task_id)).decode()
            except DecryptError:
                exc.connect_url = None
        return exc

    def _due(self, acq: Acquisition) -> bool:
        """Past its refresh point, so a resolve of our own should renew it."""
        cred = acq.credential
        point = refresh_point(cred.issued_at, cred.expires_at, self._near, self._fraction)
        return point is not None and self.clock.now() >= point

    def _meta(self, task_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(RESULT_CHANNEL_PREFIX + task_id)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    def _from_flight(self, user_id: str, server: ServerConfig, deadline: float,
                     request_id: str | None) -> Acquisition:
        assert self.sealer is not None
        key = flight_key(user_id, server.key)
        claim_ms = int(self.settings.resolve_timeout * 1000) + 5000
        failures = 0

        def retry(task_id: str) -> None:
            # Free the pair (only if it still names this task) and go again, boundedly.
            nonlocal failures
            failures += 1
            self.claims.release(key, task_id)
            if failures > _MAX_FLIGHT_RETRIES:
                raise ServiceUnavailable("resolve flights kept failing; check the workers")

        try:
            while True:
                if time.monotonic() >= deadline:
                    raise ResolveTimeout()
                task_id = new_task_id()
                joined = False
                if self.claims.claim(key, task_id, claim_ms):
                    try:
                        self.celery.send_task(TASK_RESOLVE, args=[user_id, server.name], task_id=task_id)
                    except BaseException:
                        # No task will ever run under this claim: free the pair at once.
                        self.claims.release(key, task_id)
                        raise
                    METRICS.inc("credbroker_flights_started_total")
                else:
                    holder = self.claims.holder(key)
                    if holder is None:
                        # Released between our SET and GET: the flight just finished,
                        # so its credential is probably in the cache already.
                        cached = self._from_cache(user_id, server)
                        if cached is not None:
                            return cached
                        time.sleep(_RECLAIM_PAUSE)
                        continue
                    task_id, joined = holder, True
                    METRICS.inc("credbroker_flight_joins_total")
                meta, finished_before = self.waiter.wait_joined(
                    task_id, deadline, lambda t=task_id: self.claims.holder(key) == t)
                if meta is None:
                    if time.monotonic() >= deadline:
                        raise ResolveTimeout()
                    continue  # the flight vanished (worker lost): claim again
                result = flight_result(meta)
                if not isinstance(result, dict) or result.get("superseded"):
                    retry(task_id)
                    continue
                # A joined flight that had finished before we arrived holds a claim
                # its worker never released (it died after storing the result): that
                # result did not answer this call.
                stale_join = joined and finished_before
                if "error" in result:
                    if result.get("trigger") in ("refresh", "warm") or stale_join:
                        retry(task_id)  # a background refresh failed, or an old answer: fly ourselves
                        continue
                    raise self._flight_error(result, task_id)
                try:
                    acq = from_envelope(open_envelope(self.sealer, result["ok"], result_purpose(task_id)),
                                        user_id, server.key)
                except (DecryptError, ValueError, KeyError):
                    raise BrokerError("flight result could not be opened: check that "
                                      "CREDBROKER_TRANSPORT_KEY matches the workers'") from None
                if stale_join and self._due(acq):
                    retry(task_id)
                    continue
                return acq
        except BrokerError as exc:
            if isinstance(exc, ResolveTimeout):
                exc = explain_timeout(self.redis, self.celery.conf.task_default_queue)  # no worker? say so
            record_failure(self.audit, self.clock, user_id, server, exc, request_id)
            raise exc from None
        except (redis.RedisError, KombuOperationalError, OSError):
            exc2 = ServiceUnavailable("Redis unavailable")
            record_failure(self.audit, self.clock, user_id, server, exc2, request_id)
            raise exc2 from None
