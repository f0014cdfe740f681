"""AsyncBrokerClient: ``BrokerClient`` for asyncio gateways (FastAPI, Starlette, aiohttp).

The same contract as the sync client: same settings, namespace, fast path
(one GET of the sealed cache), flight join (claim in Redis, one Celery task
per pair, wait on its result via pubsub and the result key), policy hook,
buffered audit and use marks, and the same ``broker.errors``. The pure steps
are shared with it (``workers.client_core``); only the I/O differs:

- Redis through ``redis.asyncio`` (fast path, claims, result waits);
- the caller's deadline is ``asyncio.timeout``: a stalled Redis call is
  cancelled, so ``resolve(timeout=T)`` returns or raises within T + 0.5 s;
- Celery has no async publisher, so sending a flight task runs the short kombu
  publish in a thread (``asyncio.to_thread``) bounded by the same deadline
  (``workers.common.deadline.within``); the audit buffer flushes from its own thread
  over a sync connection, as in the sync client.

A client belongs to the event loop it is first used in (its pool and result
listener live there); create it at startup and ``await client.aclose()`` at
shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from broker.errors import BrokerError, ResolveTimeout, ServiceUnavailable
from broker.keyspace import key_prefix
from broker.resolver import Acquisition, Resolved
from broker.servers import ServerConfig

from .celery.app import TASK_RESOLVE, TASK_WARM_USER
from .client_core import (DIAGNOSE_SECONDS, MAX_FLIGHT_RETRIES, RECLAIM_PAUSE, RETRY, TRANSPORT_ERRORS, ClientBase,
                          Tally, claim_ttl_ms, parse_meta, transport_failure, warm_outcome)
from .common.auditstream import StreamAuditSink
from .common.constants import TASK_ID_PREFIX, cache_key, flight_key, result_key
from .common.deadline import within
from .common.diagnose import explain_waiting
from .common.flight import CAS_DELETE, READY, finished_task, new_task_id, task_of
from .common.metrics import METRICS
from .common.redisconn import async_redis_client, redis_client

__all__ = ["AsyncBrokerClient", "Resolved"]


class _Results:
    """One pattern subscription per client wakes the coroutines waiting on
    flight results; every wait also reads the stored result, so a result
    published before the wait began is never missed."""

    def __init__(self, client: Any, get_meta: Callable[[str], Awaitable[dict[str, Any] | None]],
                 channel_prefix: str) -> None:
        self.client = client
        self.get_meta = get_meta
        self.prefix = channel_prefix
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    def _ensure_listener(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="credbroker-results")

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.prefix + TASK_ID_PREFIX + "*")
                for evs in list(self._waiters.values()):  # results may have landed while we were away
                    for ev in evs:
                        ev.set()
                delay = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=0.5)
                    task_id = finished_task(msg, len(self.prefix)) if msg and msg.get("type") == "pmessage" else None
                    for ev in self._waiters.get(task_id or "", ()):
                        ev.set()
            except (redis.RedisError, OSError, ValueError):
                await asyncio.sleep(delay)  # Redis went away: back off, resubscribe
                delay = min(delay * 2, 2.0)
            finally:
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:  # noqa: BLE001
                    pass

    async def _ready(self, task_id: str) -> dict[str, Any] | None:
        meta = await self.get_meta(task_id)
        return meta if meta is not None and meta.get("status") in READY else None

    async def wait(self, task_id: str, alive: Callable[[], Awaitable[bool]],
                   poll: float = 1.0) -> tuple[dict[str, Any] | None, bool]:
        """The task's ready meta (None: the flight vanished) and whether it was
        there on the first read; the caller's ``asyncio.timeout`` ends the wait."""
        self._ensure_listener()
        ev = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(ev)
        try:
            meta = await self._ready(task_id)
            if meta is not None:
                return meta, True
            while True:
                try:
                    await asyncio.wait_for(ev.wait(), poll)
                except TimeoutError:
                    if not await alive():
                        return await self._ready(task_id), False
                ev.clear()
                meta = await self._ready(task_id)
                if meta is not None:
                    return meta, False
        finally:
            evs = self._waiters.get(task_id, set())
            evs.discard(ev)
            if not evs:
                self._waiters.pop(task_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


class AsyncBrokerClient(ClientBase):
    """Resolves per-user credentials through the broker's workers, from asyncio.

    Arguments as ``BrokerClient``'s (``workers.client_core.ClientBase``:
    ``CREDBROKER_*`` settings, explicit arguments over them); ``connection``
    is a ``redis.asyncio.Redis``.
    """

    def _open(self, connection: Any, audit: StreamAuditSink | None) -> None:
        self.redis = connection if connection is not None else async_redis_client(self.settings)
        self._release = self.redis.register_script(CAS_DELETE)
        self.results = _Results(self.redis, self._meta, result_key("", self._ns))
        # The audit buffer flushes from its own thread, over a sync connection (opened on first flush).
        self._sync_redis = redis_client(self.settings, max_connections=4) if audit is None else None
        self.audit = audit if audit is not None else StreamAuditSink(self._sync_redis, namespace=self._ns)

    # -- public --------------------------------------------------------------

    async def resolve(self, user_id: str, server: str, timeout: float | None = None,
                      request_id: str | None = None, *, method: str | None = None,
                      url: str | None = None, dpop_nonce: str | None = None) -> Resolved:
        """The header to inject for (user, server) now; raises ``broker.errors``
        (as ``BrokerClient.resolve``)."""
        deadline = self.core.deadline(timeout)
        with Tally() as tally:
            srv = self.core.check(user_id, server, method, url, dpop_nonce)
            acq = await self._from_cache(user_id, srv, deadline)
            if acq is None:
                tally.path = "flight"
                acq = await self._from_flight(user_id, srv, deadline, request_id)
            return self.core.finish(self.audit, user_id, srv, acq, request_id, method, url, dpop_nonce)

    async def warm(self, user_id: str, servers: list[str] | None = None,
                   timeout: float | None = None) -> list[str]:
        """As ``BrokerClient.warm``: the servers queued, once their flights are started."""
        servers = self.core.warm_servers(user_id, servers)
        task_id = new_task_id()
        deadline = self.core.deadline(timeout)
        meta = None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._send(TASK_WARM_USER, [user_id, servers], task_id, None, deadline)
                meta, _ = await self.results.wait(task_id, self._always)
        except TimeoutError:
            meta = None
        except TRANSPORT_ERRORS:
            raise ServiceUnavailable("Redis unavailable") from None
        return warm_outcome(meta)

    async def aclose(self) -> None:
        await self.results.close()
        if self._owns_audit:
            await asyncio.to_thread(self.audit.close)
        if self._sync_redis is not None:
            self._sync_redis.close()
        self.celery.close()
        if self._owns_connection:
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- I/O -------------------------------------------------------------------

    @staticmethod
    async def _always() -> bool:
        return True

    async def _meta(self, task_id: str) -> dict[str, Any] | None:
        return parse_meta(await self.redis.get(result_key(task_id, self._ns)))

    async def _holder(self, key: str) -> str | None:
        value = await self.redis.get(key)
        return None if value is None else task_of(value.decode() if isinstance(value, bytes) else value)

    async def _send(self, name: str, args: list[Any], task_id: str, kwargs: dict[str, Any] | None,
                    deadline: float) -> None:
        """Celery has no async publisher: the kombu publish runs in a thread,
        its Redis socket calls bounded by the caller's deadline."""
        def send() -> None:
            with within(deadline):
                self.celery.send_task(name, args=args, task_id=task_id, kwargs=kwargs)

        await asyncio.to_thread(send)

    async def _from_cache(self, user_id: str, server: ServerConfig, deadline: float) -> Acquisition | None:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self._cached(user_id, server)
        except (redis.RedisError, OSError):  # TimeoutError is an OSError
            raise ServiceUnavailable("Redis unavailable") from None

    async def _cached(self, user_id: str, server: ServerConfig) -> Acquisition | None:
        key = cache_key(user_id, server.key, self._ns)
        return self.core.from_cache(await self.redis.get(key), key, user_id, server)

    async def _from_flight(self, user_id: str, server: ServerConfig, deadline: float,
                           request_id: str | None) -> Acquisition:
        key = flight_key(user_id, server.key, self._ns)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self._fly(user_id, server, key, deadline)
        except TimeoutError:  # the caller's deadline (asyncio.timeout) passed
            failure, explain = ResolveTimeout(), True
        except (BrokerError, *TRANSPORT_ERRORS) as exc:
            failure, explain = transport_failure(exc, deadline)
        if explain:  # no worker? say so, with one short look at the queue (its key is namespaced)
            queue = key_prefix(self._ns) + self.celery.conf.task_default_queue
            try:
                async with asyncio.timeout(DIAGNOSE_SECONDS):
                    failure = explain_waiting(int(await self.redis.llen(queue)), queue)
            except (*TRANSPORT_ERRORS, TypeError, ValueError):
                pass
        self.core.failed(self.audit, user_id, server, failure, request_id)
        raise failure from None

    async def _fly(self, user_id: str, server: ServerConfig, key: str, deadline: float) -> Acquisition:
        """Claim or join the pair's flight until it answers; the caller bounds the time."""
        failures = 0
        while True:
            task_id = new_task_id()
            joined = False
            if await self.redis.set(key, task_id, nx=True, px=claim_ttl_ms(deadline)):
                try:
                    await self._send(TASK_RESOLVE, [user_id, server.name], task_id,
                                     {"config": self.core.config}, deadline)
                except Exception:
                    # No task will run under this claim: free the pair at once. (A
                    # cancelled publish may still land: its claim just expires.)
                    await self._release(keys=[key], args=[task_id])
                    raise
                METRICS.inc("credbroker_flights_started_total")
            else:
                holder = await self._holder(key)
                if holder is None:
                    # Released between our SET and GET: the flight just finished,
                    # so its credential is probably in the cache already.
                    cached = await self._cached(user_id, server)
                    if cached is not None:
                        return cached
                    await asyncio.sleep(RECLAIM_PAUSE)
                    continue
                task_id, joined = holder, True
                METRICS.inc("credbroker_flight_joins_total")

            async def alive(t: str = task_id) -> bool:
                return await self._holder(key) == t

            meta, finished_before = await self.results.wait(task_id, alive)
            if meta is None:
                continue  # the flight vanished (worker lost): claim again
            acq = self.core.read_flight(meta, task_id, joined, finished_before, user_id, server)
            if acq is not RETRY:
                return acq
            # Free the pair (only if it still names this task) and go again, boundedly.
            failures += 1
            await self._release(keys=[key], args=[task_id])
            if failures > MAX_FLIGHT_RETRIES:
                raise ServiceUnavailable("resolve flights kept failing; check the workers")
