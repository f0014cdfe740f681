"""Celery tasks: thin shells that take ids, call one broker function, and turn
domain errors into results. Arguments are user id and server name only;
results are sealed envelopes or secret-free error dicts."""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.exceptions import Ignore
from celery.signals import task_postrun, task_revoked, worker_process_init

from broker.audit import Action, SqlAuditLog
from broker.errors import BrokerError, ConfigMismatch, NoCredential, StoreDisabled
from broker.keyspace import key_prefix
from broker.resolver import Acquisition
from broker.servers import Mode

from workers.common.auditstream import persist_audit_batch, pop_used, restore_used
from workers.common.constants import CACHE_MAX_SECONDS, beat_lock, cache_key, flight_key
from workers.common.flight import FlightGuard, new_task_id
from workers.common.metrics import cluster_incr, cluster_set
from workers.common.outcomes import FlightFailed, raise_if_failed
from workers.common.runtime import Runtime, runtime
from workers.common.upstream_guard import MAX_WAIT_SECONDS, REFRESH_MAX_WAIT_SECONDS, slot_wait
from workers.common.wire import connect_url_purpose, result_purpose, seal_envelope, to_envelope
from .app import REFRESH_QUEUE, TASK_PERSIST_AUDIT, TASK_REFRESH, TASK_REFRESH_DUE, TASK_RESOLVE, TASK_WARM, app
from .refresh_scan import ScanLock, count_flight_start, plan_sends, refresh_expires_seconds, scan_budget, take_started

__all__ = ["resolve", "refresh", "refresh_due", "persist_audit", "execute_flight", "error_result", "write_cache",
           "cache_entry"]

log = logging.getLogger(__name__)


def write_cache(rt: Runtime, user_id: str, server_key: str, env: dict[str, Any], acq: Acquisition) -> None:
    """Seal the credential into the fast-path cache until it is near expiry.

    The cached copy outlives the refresh point on purpose: between the refresh
    point and near-expiry the beat renews it while callers keep being served
    from the cache, so no caller waits on the provider. A credential served
    stale after a failed renewal is still good until then: it is cached the
    same way, so callers are not sent to a failing provider; the beat retries
    on the credential's backoff schedule.
    """
    entry = cache_entry(rt, user_id, server_key, env, acq)
    if entry is not None:
        rt.redis.set(entry[0], entry[1], px=entry[2])


def cache_entry(rt: Runtime, user_id: str, server_key: str, env: dict[str, Any],
                acq: Acquisition) -> tuple[str, str, int] | None:
    """(key, sealed value, TTL ms) of the fast-path cache entry; None when the
    credential is already too close to expiry to cache."""
    assert rt.sealer is not None
    cred = acq.credential
    now = rt.clock.now()
    cap = now + timedelta(seconds=CACHE_MAX_SECONDS)
    end = cap if cred.expires_at is None else min(cred.expires_at - rt.store.near_expiry, cap)
    ttl_ms = int((end - now).total_seconds() * 1000)
    if ttl_ms <= 0:
        return None
    key = cache_key(user_id, server_key)
    return key, seal_envelope(rt.sealer, dict(env, act="inject", out="success", rsn=None), key), ttl_ms


def error_result(rt: Runtime, task_id: str, exc: BrokerError, trigger: str) -> dict[str, Any]:
    """A flight's error as a task result. Error dicts are secret-free except a
    connect URL, whose state must not sit in Redis, a log line or Flower in the
    clear: it travels sealed to the caller, bound to this task id."""
    data = exc.to_dict()
    out: dict[str, Any] = {"error": data, "trigger": trigger}
    url = data.get("connect_url")
    if url and rt.sealer is not None:
        data["connect_url"] = None
        out["connect_url_sealed"] = rt.sealer.seal(url.encode(), connect_url_purpose(task_id))
    return out


def execute_flight(rt: Runtime, task_id: str, user_id: str, server_name: str, trigger: str) -> dict[str, Any]:
    """The body of one flight: hold the claim, re-read the store, act, seal."""
    try:
        server = rt.servers.get_server(server_name)
        if rt.sealer is None:
            raise StoreDisabled()
    except BrokerError as exc:
        return {"error": exc.to_dict()}
    # A proactive refresh has a valid credential to fall back on: it waits less for a server slot.
    slot_wait.set(REFRESH_MAX_WAIT_SECONDS if trigger == "refresh" else MAX_WAIT_SECONDS)
    guard = FlightGuard(rt.heartbeat_claims, flight_key(user_id, server.key), task_id)
    if not guard.enter():
        # A redelivered copy of a running task, or a superseded task: another
        # execution owns the pair now.
        return {"superseded": True}
    _executions[task_id] = guard.value
    try:
        # The execution's claim value is also its lease owner in the row.
        if trigger == "refresh":
            acq = rt.resolver.renew_if_due(user_id, server_name, owner=guard.value)
            if acq is None:
                return {"error": NoCredential("nothing to refresh").to_dict(), "trigger": "refresh"}
        else:
            acq = rt.resolver.acquire(user_id, server_name, owner=guard.value)
        if acq.action is Action.REFRESH:
            cluster_incr(rt.redis, "credbroker_refreshes_total", trigger="proactive" if trigger == "refresh" else "resolve",
                         outcome=acq.outcome.value)
        env = to_envelope(user_id, server.key, acq)
        write_cache(rt, user_id, server.key, env, acq)
        if server.mode is Mode.OAUTH_CONNECT and rt.store.get(user_id, server.key) is None:
            # Disconnected while this flight ran: never resurrect it in the cache.
            # (Exchange modes may mint again from the subject token; no check needed.)
            rt.redis.delete(cache_key(user_id, server.key))
        return {"ok": seal_envelope(rt.sealer, env, result_purpose(task_id)), "trigger": trigger}
    except BrokerError as exc:
        return error_result(rt, task_id, exc, trigger)
    except Exception as exc:  # noqa: BLE001 - never let Celery store a traceback that might quote a value
        log.error("flight for server %s failed: %s", server_name, type(exc).__name__)
        return {"error": BrokerError().to_dict(), "trigger": trigger}
    finally:
        guard.exit()


# task id -> the claim value of its execution running in this process, so the
# post-run hook releases exactly that execution's claim.
_executions: dict[str, str] = {}


def _run_flight(task_id: str, user_id: str, server: str, trigger: str,
                config: str | None = None) -> dict[str, Any]:
    try:
        rt = runtime()
    except BrokerError as exc:
        return {"error": exc.to_dict(), "trigger": trigger}
    except Exception as exc:  # noqa: BLE001 - e.g. a policy module failing to import: no message in Redis
        log.error("worker runtime could not be built: %s", type(exc).__name__)
        return {"error": BrokerError().to_dict(), "trigger": trigger}
    if config is not None and config != rt.servers.fingerprint:
        # Sent by a deployment with other servers sharing our Redis namespace:
        # answering from our configuration would be wrong (or "unknown server").
        log.warning("flight refused: servers configuration %s is not this worker's %s",
                    config, rt.servers.fingerprint)
        return {"error": ConfigMismatch().to_dict(), "trigger": trigger}
    result = execute_flight(rt, task_id, user_id, server, trigger)
    if result.get("superseded"):
        # Store nothing: a redelivered copy must not overwrite (or pre-empt) the
        # running execution's result under the same task id.
        log.info("flight task superseded by another execution; standing down")
        raise Ignore()
    return result


def _count_start() -> None:
    try:
        count_flight_start(runtime().redis)
    except Exception:  # noqa: BLE001 - _run_flight reports a broken runtime
        pass


@app.task(name=TASK_RESOLVE, bind=True, throws=(FlightFailed,))
def resolve(self: Any, user_id: str, server: str, config: str | None = None) -> dict[str, Any]:
    """Acquire or renew the credential for (user, server) as the pair's one flight;
    ``config`` is the sender's servers fingerprint."""
    _count_start()
    return raise_if_failed(_run_flight(self.request.id, user_id, server, "resolve", config))


@app.task(name=TASK_REFRESH, bind=True, throws=(FlightFailed,))
def refresh(self: Any, user_id: str, server: str, config: str | None = None) -> dict[str, Any]:
    """Proactively renew (user, server) if it is due; joins the same flights."""
    _count_start()
    return raise_if_failed(_run_flight(self.request.id, user_id, server, "refresh", config))


@app.task(name=TASK_REFRESH_DUE)
def refresh_due() -> dict[str, Any]:
    """Beat: send recently used credentials entering their refresh window
    through flights on the refresh queue, at most what the workers can start
    before the next scan (``workers/celery/refresh_scan.py``). One scan at a time
    cluster-wide, under a lock held for as long as the scan runs."""
    rt = runtime()
    s = rt.settings
    lock = ScanLock(rt.redis, beat_lock(), s.refresh_scan_seconds)
    if not lock.acquire():
        return {"skipped": "another scan holds the lock"}
    try:
        return _scan(rt, lock)
    finally:
        try:
            lock.release()
        except Exception as exc:  # noqa: BLE001 - the lock lapses by itself
            log.warning("refresh_due: could not release the scan lock: %s", type(exc).__name__)


def _scan(rt: Runtime, lock: ScanLock) -> dict[str, Any]:
    s = rt.settings
    if not rt.store.enabled:
        return {"skipped": "store disabled"}
    uses = pop_used(rt.redis)
    try:
        rt.store.touch_many([(u, k, datetime.fromtimestamp(t, UTC)) for u, k, t in uses])
    except BrokerError:
        restore_used(rt.redis, uses)  # keep the marks for the next scan
        raise
    now = rt.clock.now()
    # A fair share per configured server, then the idle refresh tokens to keep alive.
    due = rt.store.due(now, used_since=now - timedelta(seconds=s.recent_use_seconds), limit=10_000,
                       server_keys=[srv.key for srv in rt.servers.values()])
    due = list(dict.fromkeys(due + rt.store.keepalive_due(now, limit=1_000)))
    queued = rt.redis.llen(key_prefix() + REFRESH_QUEUE)
    budget = scan_budget(s.worker_slots, take_started(rt.redis), queued)
    guard = rt.guard
    plan = plan_sends(due, budget, (lambda k: guard.blocked(k)) if guard is not None else (lambda k: False))
    expires = refresh_expires_seconds(s.refresh_scan_seconds)
    # The claim outlives the queued task by a margin: it never lapses while the
    # task may still run. A running task's heartbeat takes over its lifetime.
    claim_ms = int((expires + 5) * 1000)
    sent = 0
    for user_id, server_key in plan.pairs:
        if not lock.keep():
            log.warning("refresh_due: lost the scan lock; stopping this scan")
            break
        server = rt.servers.by_key(server_key)
        if server is None:
            continue  # server removed or its URL changed: its credentials are not renewed
        task_id = new_task_id()
        key = flight_key(user_id, server_key)
        if rt.claims.claim(key, task_id, claim_ms):
            try:
                # No countdown: a delayed task is held by one worker outside the
                # prefetch limit; the budget paces the sends instead.
                app.send_task(TASK_REFRESH, args=[user_id, server.name], task_id=task_id, expires=expires,
                              kwargs={"config": rt.servers.fingerprint})
            except Exception as exc:  # noqa: BLE001 - one failed send must not strand the pair or the scan
                rt.claims.release(key, task_id)
                log.warning("refresh_due: could not send a refresh flight: %s", type(exc).__name__)
                continue
            sent += 1
    cluster_incr(rt.redis, "credbroker_beat_scans_total")
    cluster_set(rt.redis, "credbroker_credentials_due", len(due))
    cluster_set(rt.redis, "credbroker_refresh_queue_depth", queued)
    cluster_incr(rt.redis, "credbroker_refresh_flights_sent_total", sent)
    if due:
        log.info("refresh_due: %d due, %d flights sent (budget %d, %d queued, %d of open circuits), %d use marks",
                 len(due), sent, budget, queued, plan.skipped_open, len(uses))
    return {"due": len(due), "sent": sent, "budget": budget, "queued": queued,
            "skipped_open": plan.skipped_open, "uses": len(uses)}


@app.task(name=TASK_PERSIST_AUDIT)
def persist_audit() -> dict[str, int]:
    """Move audit events from the Redis stream to SQL in batches."""
    rt = runtime()
    sql = SqlAuditLog(rt.store.engine)
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    moved = 0
    for _ in range(20):
        n = persist_audit_batch(rt.redis, sql, consumer)
        moved += n
        if n < 1000:
            break
    return {"persisted": moved}


@task_postrun.connect
def _release_claim(sender: Any = None, task_id: str | None = None, args: Any = None, **_: Any) -> None:
    """The result is stored: release the pair's claim if this task still holds it."""
    if sender is None or sender.name not in (TASK_RESOLVE, TASK_REFRESH, TASK_WARM) or not task_id or not args:
        return
    value = _executions.pop(task_id, None)
    if value is None:
        return  # superseded: the claim belongs to another execution
    try:
        rt = runtime()
        server = rt.servers.get(args[1])
        if server is not None:
            rt.claims.release(flight_key(args[0], server.key), value)
    except Exception as exc:  # noqa: BLE001
        log.warning("claim release failed: %s", type(exc).__name__)


@task_revoked.connect
def _release_revoked(request: Any = None, expired: bool = False, **_: Any) -> None:
    """A refresh that expired in the queue never runs: free its pair now, not at the claim's TTL."""
    if request is None or getattr(request, "name", None) != TASK_REFRESH:
        return
    args = getattr(request, "args", None) or []
    if len(args) < 2:
        return
    try:
        rt = runtime()
        server = rt.servers.get(args[1])
        if server is not None:
            rt.claims.release(flight_key(args[0], server.key), request.id)
    except Exception as exc:  # noqa: BLE001
        log.warning("claim release for a revoked refresh failed: %s", type(exc).__name__)


@worker_process_init.connect
def _warm(**_: Any) -> None:
    try:
        runtime()
    except BrokerError as exc:
        log.error("worker start-up: %s", exc.message)
