"""Bulk warm row: ``credbroker warm``'s engine over N never-seen users against
a slow provider, on workers with the default pool (threads, 64 each), beside
the slot bound (workers x threads / latency) and the CPU bound (cores / CPU
per acquisition across every process on the machine); and the cost of the
connection-event outbox on the miss path's store write.

    python -m bench.warm --users 10000 --latency-ms 200

Uses its own Redis database (locked like the test clusters' dbs 1-12) and a
scratch PostgreSQL database that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from broker.clock import utcnow
from broker.db import make_engine
from broker.models import Credential, ObtainedVia, SubjectToken
from broker.secret import Secret

from .cluster import BenchCluster, Sandbox, wait_for
from .cpu import CpuMeter

__all__ = ["run_bulk_warm", "event_overhead", "create_scratch_db", "drop_scratch_db",
           "start_thread_workers"]

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def create_scratch_db(prefix: str) -> tuple[Any, str, str]:
    """A new PostgreSQL database: (admin engine, its name, its URL); ``drop_scratch_db`` removes it."""
    db = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", pool_size=1)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    return admin, db, PG_ADMIN.rsplit("/", 1)[0] + "/" + db


def drop_scratch_db(admin: Any, db: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()


def _pick_db() -> int:
    import redis

    lock = redis.Redis(host="127.0.0.1", port=6379, db=0)
    for n in range(12, 0, -1):
        if lock.set(f"credbroker-test:db-lock:{n}", os.getpid(), nx=True, ex=3600):
            return n
    raise RuntimeError("no free Redis database among 1-12")


def start_thread_workers(cluster: BenchCluster, count: int, threads: int,
                         app: str = "bench.celery_bench") -> None:
    """``count`` workers with the default pool (threads) on both queues; waits until each consumes."""
    for i in range(count):
        name = f"w{i + 1}"
        cluster.spawn(name, ["-m", "celery", "-A", app, "worker", "-c", str(threads), "-P",
                             "threads", "-n", f"{name}@{socket.gethostname()}", "--without-gossip",
                             "--without-mingle", "--without-heartbeat", "-Q", "credbroker,credbroker.refresh",
                             "--loglevel=WARNING"])
    for i in range(count):
        name = f"w{i + 1}"
        ready = cluster.workdir / f"{name}@{socket.gethostname()}"
        proc = cluster.procs[name]
        wait_for(lambda r=ready, p=proc: r.exists() or p.poll() is not None, 90, f"worker {name}")
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited:\n{cluster.log(name)[-3000:]}")


def _seed(cluster: BenchCluster, users: list[str]) -> None:
    """Subject tokens straight into the store, in batches (the sandbox issues them)."""
    expires = utcnow() + timedelta(days=1)
    for user in users:
        token = cluster.sandbox.subject_token(user, 86400)
        cluster.store.put_subject_token(user, SubjectToken(Secret(token), expires))


def _cold_resolves(cluster: BenchCluster, client: Any, names: list[str], callers: int) -> None:
    """Every name resolved once through the client (each a miss: an ordinary flight)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=callers) as pool:
        for _ in pool.map(lambda u: client.resolve(u, "tx", timeout=60), names):
            pass


def run_bulk_warm(users: int, latency_ms: int, workers: int, threads: int, window: int,
                  batch: int = 32, server_limit: int = 0, misses: int = 0) -> dict[str, Any]:
    from workers.cli.events import BulkWarm
    from workers.common.runtime import build_runtime

    workdir = Path(tempfile.mkdtemp(prefix="credbroker-bench-warm-"))
    admin, db, db_url = create_scratch_db("credbroker_bench_warm")
    sandbox = Sandbox(workdir, latency_ms=0)
    redis_db = _pick_db()
    # The cluster's slots, as the README tells an operator to set them: the
    # per-server limit is half of them.
    cluster = BenchCluster(workdir, f"redis://127.0.0.1:6379/{redis_db}", sandbox,
                           database_url=db_url,
                           extra_env={"CREDBROKER_WORKER_SLOTS": str(workers * threads),
                                      **({"CREDBROKER_SERVER_MAX_CONCURRENCY": str(server_limit)}
                                         if server_limit else {}),
                                      **({"CREDBROKER_LOG_LEVEL": "INFO"} if os.environ.get("WB_DEBUG") else {})})
    try:
        names = [f"warm-{i:05d}" for i in range(users)]
        cold = [f"miss-{i:05d}" for i in range(misses)]
        started = time.monotonic()
        _seed(cluster, names + cold)
        seed_seconds = time.monotonic() - started
        start_thread_workers(cluster, workers, threads)
        sandbox.set_latency(latency_ms)
        rt = build_runtime(cluster.settings)
        meter = CpuMeter(cluster)
        with cluster.client(connection=rt.redis, audit=rt.audit) as client:
            bulk = BulkWarm(rt, client, window, 120, batch_size=batch)
            meter.start()
            started = time.monotonic()
            for user in names:
                bulk.user(user, ["tx"])
            bulk.finish()
            elapsed = time.monotonic() - started
            cost = meter.stop(max(1, bulk.queued))
            miss_cost = None
            if cold:
                # The interactive miss path beside it: ordinary flights, one per resolve.
                meter.start()
                _cold_resolves(cluster, client, cold, 64)
                miss_cost = meter.stop(len(cold))
        rt.close()
        if bulk.failed or os.environ.get("WB_DEBUG"):
            for name in ("w1", "w2"):
                print(f"--- {name}.log (tail) ---\n{cluster.log(name)[-6000:]}", flush=True)
        calls = sandbox.token_calls()
        cores = os.cpu_count() or 1
        return {
            "users": users, "flights": bulk.queued, "failed": dict(bulk.failed), "seconds": elapsed,
            "rate": bulk.queued / elapsed, "slot_bound": workers * threads / (latency_ms / 1000),
            "cpu_ms": cost["machine"], "cpu_ms_ours": cost["ours"], "cpu_bound": cores * 1000 / cost["machine"],
            "cpu_line": CpuMeter.describe("CPU ms per acquisition", cost), "provider_calls": calls,
            "seed_seconds": seed_seconds, "workers": workers, "threads": threads, "window": window,
            "latency_ms": latency_ms, "load": os.getloadavg(), "batch": batch, "tally": dict(bulk.tally),
            "server_limit": server_limit or max(1, workers * threads // 2),
            "joined": bulk.joined, "skipped": dict(bulk.skipped),
            "miss_cpu_ms": miss_cost["machine"] if miss_cost else None,
            "miss_cpu_line": CpuMeter.describe("miss path CPU ms per acquisition", miss_cost) if miss_cost else None,
        }
    finally:
        cluster.stop()
        sandbox.stop()
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=0).delete(f"credbroker-test:db-lock:{redis_db}")
        drop_scratch_db(admin, db)
        shutil.rmtree(workdir, ignore_errors=True)


def event_overhead(rows: int = 2000) -> dict[str, float]:
    """Milliseconds per first-mint store write (the miss path's write) with the
    event outbox, and with ``announce`` replaced by a no-op, on PostgreSQL."""
    import broker.store as store_module
    from broker.crypto import Keyring
    from broker.migrate import upgrade
    from broker.store import CredentialStore

    admin, db, db_url = create_scratch_db("credbroker_bench_ev")
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        store = CredentialStore(engine, Keyring((("k", os.urandom(32)),)))
        now = utcnow()
        cred = Credential(Secret("x" * 800), obtained_via=ObtainedVia.TOKEN_EXCHANGE, issued_at=now,
                          expires_at=now + timedelta(hours=1))
        real = store_module.announce
        timings: dict[str, list[float]] = {"with": [], "without": []}
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        for rep in range(3):
            for label in ("without", "with"):
                store_module.announce = real if label == "with" else (lambda *a, **k: None)  # type: ignore[assignment]
                started, cpu_started = time.perf_counter(), time.process_time()
                for i in range(rows):
                    store.compare_and_swap(f"{label}-{rep}-{i}", "k", None, cred)
                timings[label].append(1000 * (time.perf_counter() - started) / rows)
                cpu[label].append(1000 * (time.process_time() - cpu_started) / rows)
        store_module.announce = real
        w, wo = statistics.median(timings["with"]), statistics.median(timings["without"])
        cw, cwo = statistics.median(cpu["with"]), statistics.median(cpu["without"])
        return {"with_ms": w, "without_ms": wo, "extra_ms": w - wo, "cpu_with_ms": cw, "cpu_without_ms": cwo,
                "extra_cpu_ms": cw - cwo}
    finally:
        engine.dispose()
        drop_scratch_db(admin, db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--window", type=int, default=0, help="default: workers x threads")
    parser.add_argument("--batch", type=int, default=32, help="users per warm task (credbroker warm --batch)")
    parser.add_argument("--no-event-row", action="store_true", help="skip the event-outbox measurement")
    parser.add_argument("--misses", type=int, default=1000,
                        help="cold resolves after the warm: the miss path's CPU, for the event overhead ratio")
    parser.add_argument("--server-limit", type=int, default=0,
                        help="CREDBROKER_SERVER_MAX_CONCURRENCY (default: unset, half of the workers' slots)")
    args = parser.parse_args()
    ev = event_overhead() if not args.no_event_row else {"with_ms": 0.0, "without_ms": 0.0, "cpu_with_ms": 0.0,
                                                           "cpu_without_ms": 0.0, "extra_cpu_ms": 0.0}
    print(f"event outbox on the miss path's write (PostgreSQL): wall {ev['with_ms']:.3f} ms with, "
          f"{ev['without_ms']:.3f} ms without; caller CPU {ev['cpu_with_ms']:.3f} vs {ev['cpu_without_ms']:.3f} ms "
          f"(+{ev['extra_cpu_ms']:.3f} ms)", flush=True)
    if args.users == 0:
        return
    r = run_bulk_warm(args.users, args.latency_ms, args.workers, args.threads,
                      args.window or args.workers * args.threads, args.batch, args.server_limit, args.misses)
    print(f"bulk warm: {r['flights']} flights for {r['users']} users in {r['seconds']:.1f} s = {r['rate']:.0f} "
          f"acquisitions/s; slot bound {r['slot_bound']:.0f}/s; CPU bound {r['cpu_bound']:.0f}/s "
          f"({r['cpu_ms']:.2f} CPU ms per acquisition, machine; ours {r['cpu_ms_ours']:.2f}); "
          f"provider calls {r['provider_calls']}; failed {r['failed']}; {r['tally']}, joined {r['joined']}, "
          f"skipped {r['skipped']}; batch {r['batch']}; server limit {r['server_limit']}; load {r['load']}")
    print(r["cpu_line"])
    if r["miss_cpu_ms"]:
        print(r["miss_cpu_line"])
        print(f"event overhead on the miss path: +{ev['extra_cpu_ms']:.3f} caller CPU ms = "
              f"{100 * ev['extra_cpu_ms'] / r['miss_cpu_ms']:.1f}% of the machine's CPU per miss-path acquisition")


if __name__ == "__main__":
    main()
