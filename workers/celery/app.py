"""The Celery app: Redis as message broker and result backend, from settings.

Late acks with prefetch 1, so a task whose worker dies is redelivered; a
visibility timeout well above the task time limit, so a running task is never
redelivered while it is still alive; short-lived JSON results.

Two queues: ``QUEUE`` for interactive resolves (and the small beat
housekeeping tasks), ``REFRESH_QUEUE`` for the beat's proactive refreshes. A
worker consuming both asks Redis for them in sorted name order on every fetch
(``queue_order_strategy: sorted``; kombu's default round-robin would take a
refresh every other fetch), so a resolve waits for at most one free slot,
never behind the refresh backlog. ``QUEUE`` must sort first.
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery

from broker.keyspace import key_prefix, set_namespace
from broker.settings import Settings, load_settings

from workers.common.redisconn import CONNECT_TIMEOUT, SOCKET_TIMEOUT, parse_redis_url, sentinel_kwargs
from workers.common.tracing import connect_worker_signals
from .transport import SENTINEL_TRANSPORT, TRANSPORT

__all__ = ["make_celery", "app", "TASK_RESOLVE", "TASK_REFRESH", "TASK_REFRESH_DUE", "TASK_PERSIST_AUDIT",
           "TASK_PRUNE_AUDIT", "QUEUE", "REFRESH_QUEUE", "QUEUES", "TASK_WARM", "TASK_WARM_USER",
           "TASK_WARM_BATCH",            "TASK_DELIVER_WEBHOOK"]

TASK_RESOLVE = "broker.resolve"
TASK_REFRESH = "broker.refresh"
TASK_REFRESH_DUE = "broker.refresh_due"
TASK_PERSIST_AUDIT = "broker.persist_audit"
TASK_PRUNE_AUDIT = "broker.prune_audit"
# Audit retention runs often enough that each run deletes little (bounded batches).
PRUNE_AUDIT_SECONDS = 600
# Pre-warming and event delivery (workers.celery.tasks_events).
TASK_WARM = "broker.warm"
TASK_WARM_USER = "broker.warm_user"
# Many users of one server per task (``credbroker warm --all-users``), each pair its own flight.
TASK_WARM_BATCH = "broker.warm_batch"
TASK_DELIVER_WEBHOOK = "broker.deliver_webhook"
QUEUE = "credbroker"
REFRESH_QUEUE = QUEUE + ".refresh"
# What a worker consumes by default, in the order it serves them.
QUEUES = (QUEUE, REFRESH_QUEUE)
RESULT_EXPIRES_SECONDS = 300


def make_celery(settings: Settings, *, main: bool = False) -> Celery:
    """A Celery app for these settings (``main``: the worker's, with tasks)."""
    app = Celery("credbroker", set_as_current=main)
    limit = settings.task_time_limit
    target = parse_redis_url(settings.redis_url)
    # Every kombu and result-backend socket has connect, read and keepalive
    # timeouts: a black-holed Redis must never block a sender forever.
    tcp = not target.url.startswith(("unix://", "socket://"))  # keepalive is for TCP only
    sockets = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT,
               "socket_keepalive": tcp}
    sentinel = {"master_name": target.master_name,
                "sentinel_kwargs": sentinel_kwargs(target.sentinel_password)} if target.is_sentinel else {}
    backend = "FlightSentinelBackend" if target.is_sentinel else "FlightResultBackend"
    # The namespace prefixes kombu's queues, bindings and fanout channels and the
    # result keys and channels, as it prefixes ours (``workers.common.constants``).
    prefix = key_prefix(settings.namespace)
    namespaced = {"global_keyprefix": prefix} if prefix else {}
    app.conf.update(
        broker_url=target.celery_url,
        result_backend=f"workers.celery.backend:{backend}+" + target.celery_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=limit,
        task_soft_time_limit=max(1.0, limit - 5),
        broker_transport_options={"visibility_timeout": settings.visibility_timeout or int(limit * 2 + 60),
                                  "queue_order_strategy": "sorted", **sockets, **sentinel, **namespaced},
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}, **sentinel, **namespaced},
        redis_socket_timeout=SOCKET_TIMEOUT,
        redis_socket_connect_timeout=CONNECT_TIMEOUT,
        redis_socket_keepalive=tcp,
        redis_backend_health_check_interval=15,
        # A failed publish is retried briefly; a caller's deadline bounds it further.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.05,
                                   "interval_max": 0.05},
        result_expires=RESULT_EXPIRES_SECONDS,
        task_default_queue=QUEUE,
        # Background work rides the refresh queue, behind interactive resolves
        # (warm_user only plans, and a caller waits for its answer: it stays).
        task_routes={name: {"queue": REFRESH_QUEUE} for name in (TASK_REFRESH, TASK_WARM, TASK_WARM_BATCH,
                                                                   TASK_DELIVER_WEBHOOK)},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
        # Audit moves, expiry events and webhook dispatch run on each worker's
        # housekeeping timer (workers.celery.tasks_events), not as a task per second.
        beat_schedule={
            "refresh-due": {"task": TASK_REFRESH_DUE, "schedule": timedelta(seconds=settings.refresh_scan_seconds)},
            "prune-audit": {"task": TASK_PRUNE_AUDIT, "schedule": timedelta(seconds=PRUNE_AUDIT_SECONDS)},
        },
    )
    if main:
        app.conf.imports = ["workers.celery.tasks", "workers.celery.retention", "workers.celery.tasks_events"]
        set_namespace(settings.namespace)  # the worker's and the beat's process serve this deployment
    # Connections that obey a caller's deadline (senders: clients, the API) and
    # survive a Sentinel master's death (workers); see ``workers.celery.transport``.
    app.conf.broker_transport = SENTINEL_TRANSPORT if target.is_sentinel else TRANSPORT
    return app


app = make_celery(load_settings(), main=True)
connect_worker_signals()  # OpenTelemetry in workers, only when CREDBROKER_TRACING is set
