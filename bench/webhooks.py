"""Webhook delivery rate: N real ``connection.connected`` events (first
credential writes through ``CredentialStore.compare_and_swap``, each appends
one outbox row) delivered by 2 workers with the default pool (threads, 64
each) to a loopback receiver in this process that verifies every Standard
Webhooks signature and deduplicates by ``webhook-id``.

    python -m bench.webhooks --events 2000
    python -m bench.webhooks --events 600 --rate 20       # paced: lag without a backlog
    python -m bench.webhooks --events 1000 --receiver-ms 200   # a slow receiver

Measured from the first event's time (``at`` in the outbox row) to the last
delivery received: deliveries/s, lag from event to receipt (p50/p99),
duplicates, signature failures, delivery-task runs per delivery (a worker
signal counts them) and CPU ms per delivery by process group, plus the
PostgreSQL backends serving the scratch database. Uses its own Redis database
(locked like the test clusters' dbs 1-12) and a scratch PostgreSQL database
that is dropped afterwards.

The workers run ``-A bench.webhooks``: the bench app (``bench.celery_bench``)
plus two signal handlers that count ``broker.deliver_webhook`` runs and
retries in a Redis hash (one HINCRBY per run).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from celery.signals import task_prerun, task_retry
from sqlalchemy import func, select, text

from broker.clock import utcnow
from broker.models import Credential, ObtainedVia
from broker.secret import Secret
from broker.servers import server_key

from .celery_bench import app  # noqa: F401 - the workers' app (``-A bench.webhooks``)
from .cluster import BenchCluster, Sandbox, wait_for
from .cpu import CpuMeter, _cpu_seconds
from .warm import _pick_db, create_scratch_db, drop_scratch_db, start_thread_workers

__all__ = ["Receiver", "run_webhooks", "main"]

COUNTS_KEY = "credbroker-bench:webhooks:tasks"
_DELIVER = "broker.deliver_webhook"


# -- in the workers: count delivery-task runs and retries ------------------------------


def _count(field: str) -> None:
    from workers.common.runtime import runtime

    try:
        runtime().redis.hincrby(COUNTS_KEY, field, 1)
    except Exception:  # noqa: BLE001 - a counter must never fail a task
        pass


@task_prerun.connect
def _count_run(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) == _DELIVER:
        _count("runs")


@task_retry.connect
def _count_retry(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) == _DELIVER:
        _count("retries")


# -- in the bench: the receiver --------------------------------------------------------


class Receiver:
    """A Standard Webhooks endpoint on loopback (HTTP/1.1 keep-alive, a thread
    per connection): verifies every delivery, answers 200 at once (also when
    the signature fails, which is counted, so a bad signature cannot stall the
    run in retries), records the first arrival of each ``webhook-id``."""

    def __init__(self, secret: str, delay: float = 0.0) -> None:
        from standardwebhooks.webhooks import Webhook

        self.lock = threading.Lock()
        self.arrivals: dict[str, tuple[float, float]] = {}  # webhook-id -> (received, event at), unix s
        self.requests = 0
        self.duplicates = 0
        self.bad_signatures = 0
        self.bad_payloads = 0
        self.done = threading.Event()
        self.expected = 0
        verifier = Webhook(secret)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received = time.time()
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload = verifier.verify(body, headers)
                    at = _unix(payload["data"]["at"])
                    ok, bad_payload = True, False
                except KeyError:
                    ok, bad_payload, at = True, True, received
                except Exception:  # noqa: BLE001 - standardwebhooks raises its own verification errors
                    ok, bad_payload, at = False, False, received
                if delay:
                    time.sleep(delay)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                msg_id = headers.get("webhook-id", "")
                with outer.lock:
                    outer.requests += 1
                    outer.bad_signatures += not ok
                    outer.bad_payloads += bad_payload
                    if msg_id in outer.arrivals:
                        outer.duplicates += 1
                    else:
                        outer.arrivals[msg_id] = (received, at)
                        if len(outer.arrivals) >= outer.expected > 0:
                            outer.done.set()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _unix(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- PostgreSQL backends' CPU (the scratch database's sessions) ---------------------------


def _pg_backends(admin: Any, db: str) -> dict[int, float]:
    with admin.connect() as conn:
        pids = [int(r[0]) for r in conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                                                {"d": db})]
    return {pid: _cpu_seconds(pid) for pid in pids}


# -- the run -------------------------------------------------------------------------------


def _write_events(cluster: BenchCluster, users: list[str], key: str, writers: int,
                  rate: float = 0.0) -> tuple[float, float]:
    """First credential writes for ``users`` from ``writers`` threads (paced to
    ``rate`` events/s in all when > 0); returns (wall seconds, writer threads'
    CPU seconds)."""
    now = utcnow()
    cred = Credential(Secret("x" * 800), obtained_via=ObtainedVia.TOKEN_EXCHANGE, issued_at=now,
                      expires_at=now + timedelta(hours=1))
    cpu: list[float] = []
    failed: list[str] = []

    def write(index: int, part: list[str]) -> None:
        started = time.thread_time()
        for n, user in enumerate(part):
            if rate > 0:
                pause = begin + (n * writers + index) / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            if cluster.store.compare_and_swap(user, key, None, cred) is None:
                failed.append(user)
        cpu.append(time.thread_time() - started)

    threads = [threading.Thread(target=write, args=(i, users[i::writers])) for i in range(writers)]
    started = begin = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise RuntimeError(f"{len(failed)} first writes found a row already there")
    return time.monotonic() - started, sum(cpu)


def run_webhooks(events: int, workers: int = 2, threads: int = 64, writers: int = 4, timeout: float = 300.0,
                 rate: float = 0.0, receiver_ms: int = 0, idle_seconds: float = 5.0) -> dict[str, Any]:
    from broker.db import connection_events as E
    from broker.db import event_cursors as C
    from broker.db import webhook_deliveries as W

    workdir = Path(tempfile.mkdtemp(prefix="credbroker-bench-webhooks-"))
    admin, db, db_url = create_scratch_db("credbroker_bench_wh")
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver = Receiver(secret, receiver_ms / 1000)
    receiver.expected = events
    sandbox: Sandbox | None = None
    cluster: BenchCluster | None = None
    redis_db: int | None = None
    try:
        sandbox = Sandbox(workdir, latency_ms=0)
        redis_db = _pick_db()
        cluster = BenchCluster(workdir, f"redis://127.0.0.1:6379/{redis_db}", sandbox,
                               database_url=db_url,
                               extra_env={"CREDBROKER_WORKER_SLOTS": str(workers * threads),
                                          "CREDBROKER_WEBHOOK_URLS": receiver.url,
                                          "CREDBROKER_WEBHOOK_SECRET": secret})
        start_thread_workers(cluster, workers, threads, app="bench.webhooks")
        engine = cluster.store.engine
        # The dispatcher has run once (it creates its cursor on its first empty tick).
        wait_for(lambda: _scalar(engine, select(C.c.position).where(C.c.name == "webhooks")) is not None, 30,
                 "the webhook dispatcher's first tick")
        key = server_key("tx", "https://tx.upstream.test/mcp")
        users = [f"wh-{i:05d}" for i in range(events)]
        # What the idle cluster spends (housekeeping ticks, pollers), per second.
        idle_meter = CpuMeter(cluster)
        idle_meter.start()
        time.sleep(idle_seconds)
        idle = idle_meter.stop(max(1, int(idle_seconds)))
        meter = CpuMeter(cluster)
        pg_before = _pg_backends(admin, db)
        meter.start()
        write_seconds, writer_cpu = _write_events(cluster, users, key, writers, rate)
        finished = receiver.done.wait(timeout)
        cost = meter.stop(max(1, len(receiver.arrivals)))
        pg_after = _pg_backends(admin, db)
        pg_ms = 1000 * sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items()) / max(
            1, len(receiver.arrivals))
        load = os.getloadavg()
        time.sleep(2.0)  # late duplicates, and the last delivery rows
        with receiver.lock:
            arrivals = dict(receiver.arrivals)
            duplicates, bad, requests = receiver.duplicates, receiver.bad_signatures, receiver.requests
            bad_payloads = receiver.bad_payloads
        with engine.connect() as conn:
            first_at, last_at, count = conn.execute(select(func.min(E.c.at), func.max(E.c.at), func.count())).one()
            outcomes = dict(conn.execute(select(W.c.outcome, func.count()).group_by(W.c.outcome)).all())
        counts = {k.decode(): int(v) for k, v in cluster.redis.hgetall(COUNTS_KEY).items()}
        received = [r for r, _ in arrivals.values()]
        lags = [1000 * (r - at) for r, at in arrivals.values()]
        first_event = first_at.timestamp()
        span = max(received) - first_event if received else float("nan")
        delivered = len(arrivals)
        return {
            "events": events, "outbox_rows": int(count), "delivered": delivered, "complete": finished,
            "requests": requests, "duplicates": duplicates, "bad_signatures": bad, "bad_payloads": bad_payloads,
            "seconds": span, "rate": delivered / span if received else 0.0,
            "drain_seconds": max(received) - min(received) if received else float("nan"),
            "first_delivery_s": min(received) - first_event if received else float("nan"),
            "write_seconds": write_seconds, "write_rate": events / write_seconds,
            "events_span_s": last_at.timestamp() - first_event,
            "lag_p50_ms": statistics.median(lags) if lags else float("nan"),
            "lag_p99_ms": _pct(lags, 0.99) if lags else float("nan"),
            "lag_max_ms": max(lags) if lags else float("nan"),
            "outcomes": outcomes, "task_runs": counts.get("runs", 0), "task_retries": counts.get("retries", 0),
            "cpu": cost, "writer_cpu_ms": 1000 * writer_cpu / max(1, delivered),
            "receiver_cpu_ms": cost["driver"] - 1000 * writer_cpu / max(1, delivered), "pg_cpu_ms": pg_ms,
            "cpu_line": CpuMeter.describe("CPU ms per delivery", cost), "workers": workers, "threads": threads,
            "idle_worker_cpu_ms_per_s": idle.get("worker parents", 0.0) + idle.get("worker children", 0.0),
            "writers": writers, "load": load, "paced_rate": rate, "receiver_ms": receiver_ms,
        }
    finally:
        if cluster is not None:
            cluster.stop()
        if sandbox is not None:
            sandbox.stop()
        receiver.stop()
        if redis_db is not None:
            import redis

            redis.Redis(host="127.0.0.1", port=6379, db=0).delete(f"credbroker-test:db-lock:{redis_db}")
        drop_scratch_db(admin, db)
        shutil.rmtree(workdir, ignore_errors=True)


def _scalar(engine: Any, stmt: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(stmt).scalar()


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--writers", type=int, default=4, help="threads writing the first credentials")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="pace the event writes at this many per second (default: as fast as they go)")
    parser.add_argument("--receiver-ms", type=int, default=0, help="the receiver answers after this delay")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the last delivery")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    r = run_webhooks(args.events, args.workers, args.threads, args.writers, args.timeout, args.rate,
                     args.receiver_ms)
    c = r["cpu"]
    setup = (f"paced {args.rate:g}/s" if args.rate else "burst") + (
        f", receiver {args.receiver_ms} ms" if args.receiver_ms else "")
    print(f"webhook delivery ({setup}): {r['delivered']}/{r['events']} events delivered in {r['seconds']:.1f} s from the "
          f"first event = {r['rate']:.0f} deliveries/s (events written at {r['write_rate']:.0f}/s over "
          f"{r['write_seconds']:.1f} s; first delivery +{r['first_delivery_s']:.2f} s); lag event->receipt p50 "
          f"{r['lag_p50_ms']:.0f} ms, p99 {r['lag_p99_ms']:.0f} ms, max {r['lag_max_ms']:.0f} ms; duplicates "
          f"{r['duplicates']}; signature failures {r['bad_signatures']}; delivery task runs "
          f"{r['task_runs']} ({r['task_runs'] / max(1, r['delivered']):.2f} per delivery, {r['task_retries']} "
          f"retries); delivery log {r['outcomes']}; CPU ms per delivery: workers "
          f"{c.get('worker parents', 0) + c.get('worker children', 0):.2f}, receiver {r['receiver_cpu_ms']:.2f}, "
          f"event writer {r['writer_cpu_ms']:.2f}, redis {c.get('redis', 0):.2f}, PostgreSQL backends "
          f"{r['pg_cpu_ms']:.2f}; ours {c['ours']:.2f} of {c['machine']:.2f} machine ({c['busy cores']:.1f} "
          f"cores busy; idle workers {r['idle_worker_cpu_ms_per_s']:.0f} CPU ms/s); load {tuple(round(x, 2) for x in r['load'])}"
          + ("" if r["complete"] else " [INCOMPLETE: timed out]"))
    print(r["cpu_line"])
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "cpu_line"}, default=str))
    return r


if __name__ == "__main__":
    main()
