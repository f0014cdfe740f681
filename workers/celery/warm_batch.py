"""Bulk warms: many users of one server in one task, each pair still its own flight.

Warming 10,000 users as 10,000 tasks spends most of the machine carrying
tasks (publish, task events, ack, result) and on one-row statements, while
the only wait that matters is the provider's. A batch task takes up to a few
dozen users of one server and, per (user, server) pair:

- claims the pair's flight key under a task id of the pair's own, so a
  resolve arriving meanwhile joins that pair's flight and reads its result
  exactly as an ordinary flight's; a pair whose claim is held (a resolve or a
  refresh in flight) is left to that flight and counted ``joined``;
- decides from two reads for the whole batch (rows, subject tokens) what the
  ordinary flight would do: skip with the single warm's reasons, re-cache a
  fresh credential (no provider call), mint a first exchange credential
  here, or run the ordinary flight body (``execute_flight``) for anything
  else (a renewal under the row's lease, a stale or backing-off row), so
  every rule that guards a refresh token stays in one place;
- mints through the server's breaker and concurrency limit on a per-process
  thread pool, starting calls as slots free up (several slots taken in one
  script call) and freeing each slot as its call returns;
- writes each group of finished first mints and their ``connection.connected``
  events in one transaction (``broker.store_bulk``); a pair another flight wrote first
  serves the winner's record, as ``Resolver._mint`` does;
- stores results, cache entries and claim releases in pipelines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from typing import Any

import redis

from broker.audit import Action, Outcome
from broker.errors import BrokerError, ServiceUnavailable
from broker.models import Credential, CredentialStatus, SubjectToken, refresh_point
from broker.resolved import unbound
from broker.resolver import Acquisition
from broker.servers import Mode, ServerConfig
from broker.store import StoredCredential
from broker.store_bulk import get_many, insert_first_mints, subject_tokens

from workers.actions.warm import EXCHANGE_MODES, skip_reason
from workers.common.constants import FLIGHT_HEARTBEAT_MS, cache_key, flight_key
from workers.common.flight import execution_value, new_task_id
from workers.common.metrics import DeferredCounts
from workers.common.outcomes import EXPECTED_CODES, FlightFailed, summary
from workers.common.runtime import Runtime
from workers.common.upstream_guard import UpstreamRefused
from workers.common.wire import result_purpose, seal_envelope, to_envelope
from .tasks import _executions, cache_entry, error_result, execute_flight

__all__ = ["BATCH_SIZE", "MINT_THREADS", "run_batch", "pair_meta"]

log = logging.getLogger(__name__)

# Users per batch task: enough to spread a task's carrying cost thin, few
# enough that one batch never holds a server's whole concurrency limit.
BATCH_SIZE = 32
# Provider calls a worker process makes at once for batches (they wait, not compute).
MINT_THREADS = 64

# How often a batch waiting for the server's slots looks again.
_SLOT_POLL_SECONDS = 0.02
# Finished mints stored and published together (fewer statements and round trips).
_FLUSH = 16

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _mint_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MINT_THREADS, thread_name_prefix="warm-mint")
        return _pool


@dataclass
class _Pair:
    user_id: str
    task_id: str  # the pair's flight: what a joining resolve waits on
    value: str  # its claim value (the lease owner too, for ordinary pairs)
    stored: StoredCredential | None = None
    subject: SubjectToken | None = None

    def claim(self, server_key: str) -> tuple[str, str]:
        return flight_key(self.user_id, server_key), self.value


def pair_meta(backend: Any, result: dict[str, Any]) -> dict[str, Any]:
    """The Celery result meta an ordinary flight task would have stored for
    ``result``: SUCCESS for answers, FAILURE with ``FlightFailed`` for
    failures at the provider or in the infrastructure."""
    error = result.get("error")
    if isinstance(error, dict) and error.get("error") not in EXPECTED_CODES:
        failed = backend.encode_result(FlightFailed(summary(error), result), "FAILURE")
        return backend._get_result_meta(result=failed, state="FAILURE", traceback=None, request=None)
    return backend._get_result_meta(result=result, state="SUCCESS", traceback=None, request=None)


class _Batch:
    """One batch task's pairs, claims and tallies."""

    def __init__(self, rt: Runtime, server: ServerConfig, backend: Any) -> None:
        self.rt = rt
        self.server = server
        self.backend = backend
        self.counts: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.metrics = DeferredCounts()  # provider-call counts, written with the results
        self._held: dict[str, str] = {}  # claim key -> value, kept alive by the heartbeat
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- claims -------------------------------------------------------------------

    def claim(self, pairs: list[_Pair]) -> list[_Pair]:
        """The pairs whose flight this batch now holds; the rest join flights in progress."""
        ok = self.rt.claims.claim_many([p.claim(self.server.key) for p in pairs], FLIGHT_HEARTBEAT_MS)
        mine = [p for p, won in zip(pairs, ok, strict=True) if won]
        with self._lock:
            self.counts["joined"] += len(pairs) - len(mine)
            self._held.update(p.claim(self.server.key) for p in mine if "/" in p.value)
        if self._beat is None and self._held:
            self._beat = threading.Thread(target=self._heartbeat, name="warm-batch-heartbeat", daemon=True)
            self._beat.start()
        return mine

    def _heartbeat(self) -> None:
        while not self._stop.wait(FLIGHT_HEARTBEAT_MS / 3000.0):
            with self._lock:
                held = list(self._held.items())
            try:
                self.rt.heartbeat_claims.extend_many(held, FLIGHT_HEARTBEAT_MS)
            except redis.RedisError:
                log.warning("warm batch heartbeat: Redis unavailable")

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2)

    # -- results ------------------------------------------------------------------

    def publish(self, done: list[tuple[_Pair, dict[str, Any], tuple[str, str, int] | None]]) -> None:
        """Cache entries, results (what joiners wait on) and claim releases, in one round trip."""
        if not done:
            return
        pipe = self.backend.client.pipeline(transaction=False)
        expires = self.backend.expires
        for pair, result, entry in done:
            if entry is not None:
                pipe.set(entry[0], entry[1], px=entry[2])
            meta = pair_meta(self.backend, result)
            meta["task_id"] = pair.task_id
            key, value = self.backend.get_key_for_task(pair.task_id), self.backend.encode(meta)
            pipe.setex(key, expires, value) if expires else pipe.set(key, value)
            pipe.publish(key, value)
        self.metrics.flush(pipe)
        # Released after the results, in the same round trip: a joiner that
        # finds the claim gone finds the result there.
        claims = [p.claim(self.server.key) for p, _, _ in done]
        self.rt.claims.queue_releases(pipe, claims)
        with self._lock:
            for key, _ in claims:
                self._held.pop(key, None)
        pipe.execute()

    def answer(self, pair: _Pair, acq: Acquisition) -> tuple[_Pair, dict[str, Any], tuple[str, str, int] | None]:
        assert self.rt.sealer is not None
        env = to_envelope(pair.user_id, self.server.key, acq)
        entry = cache_entry(self.rt, pair.user_id, self.server.key, env, acq)
        return pair, {"ok": seal_envelope(self.rt.sealer, env, result_purpose(pair.task_id)), "trigger": "warm"}, entry

    def failure(self, pair: _Pair, exc: BrokerError) -> tuple[_Pair, dict[str, Any], None]:
        result = error_result(self.rt, pair.task_id, exc, "warm")
        self.count_failure(result["error"], getattr(exc, "refusal", None))
        return pair, result, None

    def count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] += n

    def count_failure(self, error: dict[str, Any], refusal: str | None = None) -> None:
        """Tallied by what an operator acts on: the OAuth error, the guard's refusal, or the code."""
        code = str(error.get("error", "error"))
        label = code if code in EXPECTED_CODES else str(error.get("oauth_error") or refusal or code)
        with self._lock:
            self.failed[label] += 1


def run_batch(rt: Runtime, server_name: str, user_ids: list[str], backend: Any) -> dict[str, Any]:
    """Warm ``user_ids`` on one server; the tallies a ``credbroker warm`` summary adds up."""
    server = rt.servers.get_server(server_name)
    if rt.sealer is None:
        raise ServiceUnavailable("the store is disabled: no master key")
    batch = _Batch(rt, server, backend)
    users = list(dict.fromkeys(user_ids))
    try:
        cached, mints, ordinary = _plan(rt, server, users, batch)
        _cache(batch, batch.claim(cached))
        pending = [_mint_pool().submit(_ordinary, batch, p) for p in batch.claim(ordinary)]
        _mint_flow(batch, batch.claim(mints))
        for fut in pending:
            fut.result()
    finally:
        batch.close()
    return {"server": server.name, "users": len(users), **batch.counts, "skipped": dict(batch.skipped),
            "failed": dict(batch.failed)}


def _plan(rt: Runtime, server: ServerConfig, users: list[str],
          batch: _Batch) -> tuple[list[_Pair], list[_Pair], list[_Pair]]:
    """Split the users into re-cache, first mint and ordinary flight (skips counted)."""
    now = rt.clock.now()
    rows = get_many(rt.store, server.key, users)
    exchange = server.mode in EXCHANGE_MODES
    need_subject = [u for u in users if exchange and (u not in rows or rows[u].credential.is_expired(now))]
    subjects = subject_tokens(rt.store, need_subject) if need_subject else {}
    cached: list[_Pair] = []
    mints: list[_Pair] = []
    ordinary: list[_Pair] = []
    for user in users:
        stored, subject = rows.get(user), subjects.get(user)
        reason = skip_reason(rt, user, server, stored, subject, now)
        if reason is not None:
            batch.skipped[reason] += 1
            continue
        task_id = new_task_id()
        if stored is None:
            mints.append(_Pair(user, task_id, execution_value(task_id), None, subject))
        elif stored.status is CredentialStatus.CONNECTED and not unbound(server, stored.credential) and \
                not _due(rt, stored.credential, now):
            cached.append(_Pair(user, task_id, execution_value(task_id), stored))
        else:
            # The ordinary flight enters the claim itself (bare task id, as a sender sets it).
            ordinary.append(_Pair(user, task_id, task_id, stored))
    return cached, mints, ordinary


def _due(rt: Runtime, cred: Credential, now: Any) -> bool:
    point = refresh_point(cred.issued_at, cred.expires_at, rt.store.near_expiry, rt.store.refresh_fraction)
    return point is not None and now >= point


def _cache(batch: _Batch, pairs: list[_Pair]) -> None:
    """Fresh credentials: re-cache them for the fast path; nobody is asked."""
    if not pairs:
        return
    rt, server = batch.rt, batch.server
    now = rt.clock.now()
    batch.publish([batch.answer(p, Acquisition(p.stored.credential, Action.INJECT))  # type: ignore[union-attr]
                   for p in pairs])
    batch.count("cached", len(pairs))
    stale = [(p.user_id, server.key, now) for p in pairs if p.stored is not None and
             (p.stored.last_used_at is None or now - p.stored.last_used_at >= rt.resolver.touch_interval)]
    rt.store.touch_many(stale)
    if server.mode is Mode.OAUTH_CONNECT:
        # Disconnected while we cached: never resurrect it on the fast path.
        still = get_many(rt.store, server.key, [p.user_id for p in pairs])
        gone = [cache_key(p.user_id, server.key) for p in pairs if p.user_id not in still]
        if gone:
            rt.redis.delete(*gone)


def _ordinary(batch: _Batch, pair: _Pair) -> None:
    """A pair the bulk path does not cover: the ordinary flight body, its result stored for joiners."""
    result = execute_flight(batch.rt, pair.task_id, pair.user_id, batch.server.name, "warm")
    value = _executions.pop(pair.task_id, pair.task_id)
    if result.get("superseded"):
        batch.count("joined")
        return
    if "error" in result:
        batch.count_failure(result["error"])
    else:
        batch.count("renewed")
    batch.publish([(_Pair(pair.user_id, pair.task_id, value), result, None)])


class _Refused(Exception):
    """The server's breaker or limit refused the rest of the batch."""

    def __init__(self, refusal: UpstreamRefused) -> None:
        self.refusal = refusal


def _slots(batch: _Batch, wanted: int, waited_since: float) -> list[str] | None:
    """Tokens for up to ``wanted`` calls now (maybe none); None when unguarded.
    Raises ``_Refused`` when the circuit is open or the wait for slots is over."""
    guard, server = batch.rt.guard, batch.server
    if guard is None:
        return None
    try:
        tokens = guard.take_slots(server.key, wanted)
        if not tokens:
            # Background work waits its turn while the server's slots are busy,
            # as long as one call may last; the window bounds how many batches wait.
            if time.monotonic() - waited_since >= guard.limits.call_seconds:
                raise _Refused(UpstreamRefused("server_busy", "authorization server busy: its concurrency "
                                               "limit is reached"))
            return []
        verdict, left = guard.allow(server.key)
    except redis.RedisError:
        log.warning("server guard unavailable for server %s: calling unguarded", server.name)
        return None
    if verdict == 1:
        return tokens
    _release(batch, tokens if not verdict else tokens[1:])
    if not verdict:
        raise _Refused(UpstreamRefused("circuit_open", "authorization server circuit open: calls paused after "
                                       "repeated failures", retry_after=left))
    return tokens[:1]  # half-open: this one call is the probe


def _release(batch: _Batch, tokens: list[str]) -> None:
    if batch.rt.guard is not None and tokens:
        try:
            batch.rt.guard.release_slots(batch.server.key, tokens)
        except redis.RedisError:
            pass  # the tokens' expiry frees the slots


def _mint_flow(batch: _Batch, pairs: list[_Pair]) -> None:
    """First mints, started as the server's limit frees slots (each slot back
    the moment its call is), stored and published in groups as they finish."""
    rt, server = batch.rt, batch.server
    pending = deque(pairs)
    running: dict[Future[Credential], tuple[_Pair, str | None]] = {}
    finished: list[tuple[_Pair, Future[Credential]]] = []
    waited_since = time.monotonic()
    try:
        while pending or running:
            if pending:
                tokens = _slots(batch, len(pending), waited_since)
                for token in tokens if tokens is not None else [None] * len(pending):
                    pair = pending.popleft()
                    fut = _mint_pool().submit(batch.metrics.run, rt.oauth.mint, server,
                                              pair.subject.token)  # type: ignore[union-attr]
                    running[fut] = (pair, token)
                if tokens is None or tokens:
                    waited_since = time.monotonic()
            if running:
                done, _ = wait_all(running, timeout=_SLOT_POLL_SECONDS if pending else None,
                                   return_when=FIRST_COMPLETED)
                back = [running.pop(f) + (f,) for f in done]
                _release(batch, [token for _, token, _ in back if token is not None])
                finished.extend((pair, f) for pair, _, f in back)
            elif pending:
                time.sleep(_SLOT_POLL_SECONDS)
            if len(finished) >= _FLUSH or (finished and not running):
                _finish(batch, finished)
                finished = []
    except _Refused as refused:
        batch.publish([batch.failure(p, refused.refusal) for p in pending])
        pending.clear()
        wait_all(running)
        _release(batch, [token for _, token in running.values() if token is not None])
        finished.extend((pair, f) for f, (pair, _) in running.items())
        _finish(batch, finished)


def _finish(batch: _Batch, finished: list[tuple[_Pair, Future[Credential]]]) -> None:
    """Store and publish a group of finished mints; their outcome into the breaker."""
    minted: list[tuple[_Pair, Credential]] = []
    done: list[tuple[_Pair, dict[str, Any], tuple[str, str, int] | None]] = []
    alive, transient = False, 0
    for pair, fut in finished:
        exc = fut.exception()
        if exc is None:
            minted.append((pair, fut.result()))
            alive = True
        elif isinstance(exc, BrokerError):
            retryable = bool(getattr(exc, "retryable", False))
            alive = alive or not retryable
            transient += retryable
            done.append(batch.failure(pair, exc))
        else:
            log.error("warm mint for server %s failed: %s", batch.server.name, type(exc).__name__)
            done.append(batch.failure(pair, BrokerError()))
    _record(batch, alive, transient)
    done.extend(_store_mints(batch, minted))
    batch.publish(done)


def _record(batch: _Batch, alive: bool, transient: int) -> None:
    """A group's outcome into the breaker: alive if any answer came back, else its failures."""
    guarded = getattr(batch.rt.resolver.oauth, "record_outcome", None)
    if guarded is None:
        return
    if alive:
        guarded(batch.server, ok=True)
        return
    for _ in range(transient):
        guarded(batch.server, ok=False)


def _store_mints(batch: _Batch, minted: list[tuple[_Pair, Credential]]) -> list[Any]:
    rt, server = batch.rt, batch.server
    if not minted:
        return []
    now = rt.clock.now()
    try:
        written = insert_first_mints(rt.store, server.key, [(p.user_id, c) for p, c in minted], used_at=now)
        lost = [p.user_id for p, _ in minted if p.user_id not in written]
        winners = get_many(rt.store, server.key, lost) if lost else {}
    except BrokerError as exc:
        return [batch.failure(p, exc) for p, _ in minted]
    out = []
    for pair, cred in minted:
        current = winners.get(pair.user_id)
        if pair.user_id in written or current is None or _due(rt, current.credential, now):
            out.append(batch.answer(pair, Acquisition(cred, Action.ACQUIRE)))
        else:
            out.append(batch.answer(pair, Acquisition(current.credential, Action.ACQUIRE, Outcome.SUCCESS,
                                                      "minted_elsewhere")))
    batch.count("minted", len(written))
    batch.count("minted_elsewhere", len(minted) - len(written))
    return out

