"""Celery tasks for pre-warming and event delivery, and the worker's
housekeeping thread (audit mover, expiry scan, webhook dispatch).

Housekeeping runs on a timer inside each worker, not as a beat task per
second, so Flower's task list shows flights, warms and deliveries only. The
audit mover is safe in every worker (a Redis consumer group hands each event
to one); the expiry scan and the webhook dispatcher take a short Redis lock
per tick and keep their positions in the database.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from typing import Any

import httpx
from celery.signals import worker_ready, worker_shutdown

from broker.audit import SqlAuditLog
from broker.errors import BrokerError, ConfigMismatch, InvalidRequest
from broker.events import Event, EventLog, announce_expired
from broker.keyspace import key_prefix
from broker.validation import validate_user_id

from workers.actions.warm import warm_user
from workers.common.auditstream import persist_audit_batch
from workers.common.constants import PREFIX
from workers.common.metrics import cluster_incr
from workers.common.outcomes import EXPECTED_CODES, FlightFailed, raise_if_failed
from workers.common.runtime import Runtime, runtime
from .app import TASK_DELIVER_WEBHOOK, TASK_WARM, TASK_WARM_BATCH, TASK_WARM_USER, app
from .tasks import _run_flight
from .warm_batch import run_batch
from .webhooks import DEAD, DELIVERED, FAILED, DeliveryLog, endpoint_label, message, retry_delay, signed_headers

__all__ = ["warm", "warm_user_task", "warm_batch", "deliver_webhook", "Housekeeper", "dispatch_events", "WebhookDeliveryFailed"]

log = logging.getLogger(__name__)

# Users one warm batch task may carry (the CLI sends 32 by default).
MAX_BATCH_USERS = 1000
HOUSEKEEPING_LOCK = PREFIX + "housekeeping:events"
WEBHOOK_CURSOR = "webhooks"
# The housekeeping tick: audit moves, the expiry scan and webhook dispatch.
TICK_SECONDS = 1.0
# Deliveries one worker process runs at once: a slow receiver holds at most
# this many pool slots, whatever the pool size; the rest wait in the queue.
_DELIVERY_SLOTS = threading.BoundedSemaphore(4)


class WebhookDeliveryFailed(Exception):
    """Raised when a webhook was not accepted after its last attempt (secret-free)."""

    def __repr__(self) -> str:
        return f"WebhookDeliveryFailed: {self.args[0] if self.args else ''}"


# -- warm ---------------------------------------------------------------------------


@app.task(name=TASK_WARM, bind=True, throws=(FlightFailed,))
def warm(self: Any, user_id: str, server: str) -> dict[str, Any]:
    """A warm flight: the resolve ordering for (user, server) with no caller."""
    return raise_if_failed(_run_flight(self.request.id, user_id, server, "warm"))


@app.task(name=TASK_WARM_BATCH, bind=True, throws=(FlightFailed,))
def warm_batch(self: Any, server: str, user_ids: list[str], config: str | None = None) -> dict[str, Any]:
    """Warm many users of one server, each pair its own flight
    (``workers/celery/warm_batch.py``). Arguments and result are ids and counts."""
    try:
        rt = runtime()
    except BrokerError as exc:
        return raise_if_failed({"error": exc.to_dict()})
    if config is not None and config != rt.servers.fingerprint:
        return {"error": ConfigMismatch().to_dict()}
    try:
        if not isinstance(server, str) or not isinstance(user_ids, list) or len(user_ids) > MAX_BATCH_USERS:
            raise InvalidRequest(f"a warm batch is a server name and at most {MAX_BATCH_USERS} user ids")
        for user_id in user_ids:
            validate_user_id(user_id)
    except InvalidRequest as exc:
        return {"error": exc.to_dict()}
    try:
        result = run_batch(rt, server, user_ids, self.backend)
    except BrokerError as exc:
        return raise_if_failed({"error": exc.to_dict()})
    except Exception as exc:  # noqa: BLE001 - never let Celery store a traceback that might quote a value
        log.error("warm batch for server %s failed: %s", server, type(exc).__name__)
        return raise_if_failed({"error": BrokerError().to_dict()})
    failures = {k: v for k, v in result["failed"].items() if k not in EXPECTED_CODES}
    if failures:
        raise FlightFailed(f"{sum(failures.values())} of {result['users']} warms failed: "
                           + ", ".join(f"{k} x{v}" for k, v in sorted(failures.items())), result)
    return result


def _send(name: str, args: list[Any], task_id: str) -> None:
    app.send_task(name, args=args, task_id=task_id)


@app.task(name=TASK_WARM_USER)
def warm_user_task(user_id: str, servers: list[str] | None = None, exchange_only: bool = False) -> dict[str, Any]:
    """Plan and start a user's warm (for callers without the database)."""
    try:
        plan, started = warm_user(runtime(), user_id, servers, _send, TASK_WARM, exchange_only=exchange_only)
    except BrokerError as exc:
        return {"error": exc.to_dict()}
    return {"queued": plan.queued, "skipped": plan.skipped, "started": len(started)}


# -- webhooks -------------------------------------------------------------------------


@app.task(name=TASK_DELIVER_WEBHOOK, bind=True, max_retries=None)
def deliver_webhook(self: Any, event_id: int, endpoint: int, attempt: int = 1) -> dict[str, Any]:
    """POST one event to one endpoint; on failure retry with exponential backoff,
    after the last attempt record the dead letter and end as FAILURE."""
    rt = runtime()
    s = rt.settings
    if endpoint >= len(s.webhook_urls) or s.webhook_secret is None:
        return {"skipped": "endpoint not configured"}
    url = s.webhook_urls[endpoint]
    label = endpoint_label(url)
    if not _DELIVERY_SLOTS.acquire(blocking=False):
        # This process's delivery slots are busy: back to the queue, same attempt,
        # before any database read (a slow receiver made these bounces cost
        # two reads each), after a spread-out pause.
        raise self.retry(kwargs={"event_id": event_id, "endpoint": endpoint, "attempt": attempt},
                         countdown=0.5 + random.random())
    deliveries = DeliveryLog(rt.store.engine)
    try:
        if deliveries.delivered(event_id, label):
            return {"event": event_id, "outcome": "already_delivered"}
        event = EventLog(rt.store.engine, _names(rt)).get(event_id)
        if event is None:
            return {"event": event_id, "outcome": "event_gone"}
        status, error = _post(rt, url, event)
    finally:
        _DELIVERY_SLOTS.release()
    now = rt.clock.now()
    if status is not None and 200 <= status < 300:
        deliveries.record(event_id, label, attempt, DELIVERED, status, None, now)
        cluster_incr(rt.redis, "credbroker_webhook_deliveries_total", outcome=DELIVERED)
        return {"event": event_id, "outcome": DELIVERED, "attempt": attempt, "status": status}
    reason = error or f"http_{status}"
    if attempt >= s.webhook_max_attempts:
        deliveries.record(event_id, label, attempt, DEAD, status, reason, now)
        cluster_incr(rt.redis, "credbroker_webhook_deliveries_total", outcome=DEAD)
        log.warning("webhook event %s to %s dead after %d attempts: %s", event_id, label, attempt, reason)
        raise WebhookDeliveryFailed(f"{reason} after {attempt} attempts")
    deliveries.record(event_id, label, attempt, FAILED, status, reason, now)
    cluster_incr(rt.redis, "credbroker_webhook_deliveries_total", outcome=FAILED)
    raise self.retry(kwargs={"event_id": event_id, "endpoint": endpoint, "attempt": attempt + 1},
                     countdown=retry_delay(attempt, s.webhook_retry_seconds))


def _post(rt: Runtime, url: str, event: Event) -> tuple[int | None, str | None]:
    s = rt.settings
    assert s.webhook_secret is not None
    msg_id, body = message(event)
    headers = signed_headers(s.webhook_secret.reveal(), msg_id, body, rt.clock.now())
    try:
        response = rt.http.post(url, content=body.encode(), headers=headers, timeout=s.webhook_timeout,
                                follow_redirects=False)
    except httpx.HTTPError as exc:
        return None, type(exc).__name__
    return response.status_code, None


def _names(rt: Runtime) -> Any:
    def name(key: str) -> str | None:
        server = rt.servers.by_key(key)
        return None if server is None else server.name

    return name


def dispatch_events(rt: Runtime, limit: int = 500) -> int:
    """Hand new events to delivery tasks, one per (event, endpoint), in order."""
    urls = rt.settings.webhook_urls
    if not urls or rt.settings.webhook_secret is None:
        return 0

    def send(event: Event) -> None:
        for index in range(len(urls)):
            app.send_task(TASK_DELIVER_WEBHOOK, args=[event.id, index])

    return EventLog(rt.store.engine, _names(rt)).claim_batch(WEBHOOK_CURSOR, limit, send)


# -- housekeeping -------------------------------------------------------------------------


class Housekeeper:
    """The worker's timer: moves audit events, announces expiries, dispatches
    webhooks. One per worker process tree; stops with the worker."""

    def __init__(self, tick: float = TICK_SECONDS) -> None:
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="credbroker-housekeeping", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - a bad tick must not end housekeeping
                log.warning("housekeeping tick failed: %s", type(exc).__name__)

    def run_once(self) -> None:
        rt = runtime()
        if not rt.store.enabled:
            return
        sql = SqlAuditLog(rt.store.engine)
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        for _ in range(20):
            if persist_audit_batch(rt.redis, sql, consumer) < 1000:
                break
        if not rt.redis.set(key_prefix() + HOUSEKEEPING_LOCK, consumer, nx=True, px=int(self.tick * 900)):
            return  # another worker does this tick's event work
        announce_expired(rt.store.engine, rt.clock.now())
        while dispatch_events(rt) == 500:
            pass


_housekeeper: Housekeeper | None = None


@worker_ready.connect
def _start_housekeeping(**_: Any) -> None:
    global _housekeeper
    _housekeeper = Housekeeper()
    _housekeeper.start()


@worker_shutdown.connect
def _stop_housekeeping(**_: Any) -> None:
    if _housekeeper is not None:
        _housekeeper.stop()
