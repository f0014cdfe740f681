"""BrokerClient: what upstream services call to get the header to inject.

Fast path: one Redis GET of the sealed credential, cached until it is near
expiry (the beat renews it from its refresh point on). Miss or near expiry: join or start the (user, server) flight
and wait for its sealed result. Policy and audit run on every call, here, in
the caller's process. Safe to share across threads. The steps it shares with ``AsyncBrokerClient``
(``workers.aclient``) live in ``workers.client_core``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from broker.keyspace import key_prefix
from broker.errors import BrokerError, ResolveTimeout, ServiceUnavailable
from broker.resolver import Acquisition, Resolved
from broker.servers import ServerConfig

from .celery.app import TASK_RESOLVE
from .client_core import (DIAGNOSE_SECONDS, MAX_FLIGHT_RETRIES, RECLAIM_PAUSE, RETRY, TRANSPORT_ERRORS, ClientBase,
                          Tally, claim_ttl_ms, parse_meta, transport_failure, warm_outcome)
from .common.auditstream import StreamAuditSink
from .common.constants import cache_key, flight_key, result_key
from .common.deadline import grace, within
from .common.diagnose import explain_timeout
from .common.flight import Claims, ResultWaiter, new_task_id
from .common.metrics import METRICS
from .common.runtime import redis_client
from .aclient import AsyncBrokerClient  # the asyncio twin, re-exported here

__all__ = ["BrokerClient", "AsyncBrokerClient", "Resolved"]

log = logging.getLogger(__name__)


class BrokerClient(ClientBase):
    """Resolves per-user credentials through the broker's workers.

    Arguments: ``workers.client_core.ClientBase``; ``connection`` is a
    ``redis.Redis``.
    """

    def _open(self, connection: redis.Redis | None, audit: StreamAuditSink | None) -> None:
        # A process that already has a Redis pool and audit sink (the API) shares them.
        self.redis = connection if connection is not None else redis_client(self.settings)
        self.claims = Claims(self.redis)
        self.waiter = ResultWaiter(self.redis, self._meta, result_key("", self._ns))
        self.audit = audit if audit is not None else StreamAuditSink(self.redis, namespace=self._ns)

    # -- public --------------------------------------------------------------

    def resolve(self, user_id: str, server: str, timeout: float | None = None,
                request_id: str | None = None, *, method: str | None = None,
                url: str | None = None, dpop_nonce: str | None = None) -> Resolved:
        """The header to inject for (user, server) now; raises ``broker.errors``.

        For a DPoP server, ``method`` and ``url`` (the upstream request) add a
        fresh proof, signed here in the caller's process; ``Resolved.apply``
        sets both headers and ``Resolved.dpop_proof`` mints more. ``dpop_nonce``:
        the resource server's latest ``DPoP-Nonce``, put in the proof."""
        # Every Redis call below, the fast path's included, obeys this deadline.
        deadline = self.core.deadline(timeout)
        with Tally() as tally:
            srv = self.core.check(user_id, server, method, url, dpop_nonce)
            with within(deadline):
                acq = self._from_cache(user_id, srv)
                if acq is None:
                    tally.path = "flight"
                    acq = self._from_flight(user_id, srv, deadline, request_id)
            return self.core.finish(self.audit, user_id, srv, acq, request_id, method, url, dpop_nonce)

    def warm(self, user_id: str, servers: list[str] | None = None, timeout: float | None = None) -> list[str]:
        """Warm the user's credentials (every configured server, or ``servers``)
        and return the servers queued; returns once the flights are started, not
        finished. Skipped servers (never connected, no subject token, policy)
        are left out; ``POST /v1/warm`` also says why."""
        from .celery.app import TASK_WARM_USER

        servers = self.core.warm_servers(user_id, servers)
        task_id = new_task_id()
        deadline = self.core.deadline(timeout)
        try:
            self.celery.send_task(TASK_WARM_USER, args=[user_id, servers], task_id=task_id)
            meta = self.waiter.wait(task_id, deadline, lambda: True)
        except TRANSPORT_ERRORS:
            raise ServiceUnavailable("Redis unavailable") from None
        return warm_outcome(meta)

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
        key = cache_key(user_id, server.key, self._ns)
        try:
            blob = self.redis.get(key)
        except redis.RedisError:
            raise ServiceUnavailable("Redis unavailable") from None
        return self.core.from_cache(blob, key, user_id, server)

    # -- flight ------------------------------------------------------------------

    def _meta(self, task_id: str) -> dict[str, Any] | None:
        return parse_meta(self.redis.get(result_key(task_id, self._ns)))

    def _from_flight(self, user_id: str, server: ServerConfig, deadline: float,
                     request_id: str | None) -> Acquisition:
        key = flight_key(user_id, server.key, self._ns)
        failures = 0

        def retry(task_id: str) -> None:
            # Free the pair (only if it still names this task) and go again, boundedly.
            nonlocal failures
            failures += 1
            self.claims.release(key, task_id)
            if failures > MAX_FLIGHT_RETRIES:
                raise ServiceUnavailable("resolve flights kept failing; check the workers")

        try:
            while True:
                if time.monotonic() >= deadline:
                    raise ResolveTimeout()
                task_id = new_task_id()
                joined = False
                if self.claims.claim(key, task_id, claim_ttl_ms(deadline)):
                    try:
                        self.celery.send_task(TASK_RESOLVE, args=[user_id, server.name], task_id=task_id,
                                              kwargs={"config": self.core.config})
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
                        time.sleep(RECLAIM_PAUSE)
                        continue
                    task_id, joined = holder, True
                    METRICS.inc("credbroker_flight_joins_total")
                meta, finished_before = self.waiter.wait_joined(
                    task_id, deadline, lambda t=task_id: self.claims.holder(key) == t)
                if meta is None:
                    if time.monotonic() >= deadline:
                        raise ResolveTimeout()
                    continue  # the flight vanished (worker lost): claim again
                acq = self.core.read_flight(meta, task_id, joined, finished_before, user_id, server)
                if acq is RETRY:
                    retry(task_id)
                    continue
                return acq
        except (BrokerError, *TRANSPORT_ERRORS) as exc:
            failure, explain = transport_failure(exc, deadline)
        if explain:
            with grace(DIAGNOSE_SECONDS):  # no worker? say so (the queue's key is namespaced)
                failure = explain_timeout(self.redis, key_prefix(self._ns) + self.celery.conf.task_default_queue)
        self.core.failed(self.audit, user_id, server, failure, request_id)
        raise failure from None
