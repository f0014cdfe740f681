"""``python -m bench``: run every benchmark row and print the results table.

    python -m bench                      # full run, writes bench/RESULTS.md
    python -m bench --smoke              # tiny sizes, no thresholds, nothing written
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from workers.common.constants import AUDIT_STREAM, USED_ZSET

from sandbox.hung import HungServer

from .afastpath import run_async_fast_path
from .backlog import run_backlog
from .burst import run_burst
from .dpop import run_dpop_fast_path
from .cluster import BenchCluster, RedisService, Sandbox, vm_hwm_kib
from .fastpath import FAST_USERS, run_fast_path
from .httpapi import run_http
from .isolation import run_isolation
from .machine import describe, pg_version
from .miss import measure_noop, run_miss_path
from .refresh import run_refresh
from .report import Report, ms
from .scan import run_scan

DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BUDGET_SECONDS = 350  # the full run must finish within 6 minutes on 2 cores
# Row 5 on 2 cores: ~40 s for SQLite alone, ~15 s more with PostgreSQL built alongside.
SCAN_SECONDS, PG_SCAN_EXTRA_SECONDS = 40, 15


@dataclass(frozen=True)
class Sizes:
    reps: int
    loop_reps: int  # rows 1 and 2: short interleaved loops, so a noisy neighbour skews one, not the median
    loop_seconds: float
    workers: int
    concurrency: int
    miss_pairs: int
    miss_threads: int
    noop_count: int
    burst_callers: int
    burst_processes: int
    scan_sizes: tuple[int, ...]
    scan_due: int
    scan_runs: int
    refresh_users: int
    refresh_seconds: float
    refresh_lifetime: int
    iso_pairs: int  # row 8: cold resolves (and renewals) per phase
    iso_due: int
    backlog_pairs: int  # row 9: cold resolves per phase
    backlog_queued: int


FULL = Sizes(reps=3, loop_reps=5, loop_seconds=0.8, workers=2, concurrency=4, miss_pairs=200, miss_threads=32,
             noop_count=300, burst_callers=500, burst_processes=4, scan_sizes=(10_000, 100_000, 1_000_000),
             scan_due=1_000, scan_runs=5, refresh_users=1_000, refresh_seconds=60, refresh_lifetime=10,
             iso_pairs=100, iso_due=1_000, backlog_pairs=100, backlog_queued=10_000)
SMOKE = Sizes(reps=3, loop_reps=3, loop_seconds=0.2, workers=2, concurrency=2, miss_pairs=12, miss_threads=8,
              noop_count=24, burst_callers=40, burst_processes=2, scan_sizes=(1_000, 2_000, 5_000),
              scan_due=100, scan_runs=3, refresh_users=20, refresh_seconds=10, refresh_lifetime=10,
              iso_pairs=7, iso_due=50, backlog_pairs=8, backlog_queued=300)

# Short credentials in row 6 need a short refresh rhythm; the other rows use
# 1-hour credentials, which these settings do not touch.
REFRESH_ENV = {
    "CREDBROKER_NEAR_EXPIRY_SECONDS": "1",
    "CREDBROKER_REFRESH_FRACTION": "0.7",
    "CREDBROKER_REFRESH_SCAN_SECONDS": "0.5",
    "CREDBROKER_REFRESH_JITTER_SECONDS": "0.5",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, short runs, no thresholds")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the table here (default: bench/RESULTS.md for a full run, nothing for --smoke)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS,
                   help="Redis to use (its database is flushed); a private redis-server is started if it does not answer")
    p.add_argument("--database-url", default=None, help="broker database for the cluster rows (default: SQLite file)")
    p.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL admin URL for the scan row; 'none' to skip")
    p.add_argument("--refresh-latency-ms", type=int, default=20, help="provider latency during row 6")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    return p


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop every child process


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    sizes = SMOKE if args.smoke else FULL
    out = args.out if args.out is not None else (None if args.smoke else Path(__file__).parent / "RESULTS.md")
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    workdir = Path(tempfile.mkdtemp(prefix="credbroker-bench-"))
    report = Report(smoke=args.smoke)
    timer = _Timer()
    timer.row(f"start-up: work directory {workdir}, {sizes.workers} workers x {sizes.concurrency}")
    pg_admin = None if args.pg_url == "none" else args.pg_url
    pg = pg_version(pg_admin) if pg_admin else None
    redis_service = RedisService(args.redis_url, workdir)
    report.machine = describe(redis_service.url, redis_service.started, pg)
    sandbox: Sandbox | None = None
    cluster: BenchCluster | None = None
    client = None
    hung = HungServer().start()
    try:
        sandbox = Sandbox(workdir)
        # The per-server limit and the scan budget size themselves from the slots.
        slots = {"CREDBROKER_WORKER_SLOTS": str(sizes.workers * sizes.concurrency)}
        cluster = BenchCluster(workdir, redis_service.url, sandbox, database_url=args.database_url,
                               extra_env={**REFRESH_ENV, **slots}, hung_url=hung.url)
        workers = cluster.start_workers(sizes.workers, sizes.concurrency)
        start_hwm = _worker_hwm(cluster, workers)
        report.settings = [
            ("workers", f"{sizes.workers} Celery worker processes x {sizes.concurrency} prefork children "
                        f"(-A bench.celery_bench), log level WARNING"),
            ("database", "SQLite file (WAL)" if args.database_url is None else cluster.settings.database_url.split("@")[-1]),
            ("repetitions", f"median of {sizes.loop_reps} interleaved loops of {sizes.loop_seconds:g} s (rows 1-2), "
                            f"of {sizes.reps} repetitions (rows 3-5)"),
        ] + [(k.removeprefix("CREDBROKER_"), v) for k, v in REFRESH_ENV.items()]
        # Row 3 takes two cold pairs (tx, obo) per user, at two latencies; row 6 reuses the same users on rf.
        pool = [f"u-{i:05d}" for i in range(max(sizes.reps * sizes.miss_pairs + 2, sizes.refresh_users))]
        burst_users = [f"burst-{i}" for i in range(sizes.reps + 1)]
        t0 = time.monotonic()
        cluster.sign_in(FAST_USERS + burst_users + pool)
        _log(f"signed in {len(pool) + len(burst_users) + len(FAST_USERS)} users in {time.monotonic() - t0:.1f} s")
        client = cluster.client()

        timer.row("row 1: fast path")
        run_fast_path(cluster, client, report, sizes.loop_reps, sizes.loop_seconds)
        cluster.redis.delete(AUDIT_STREAM, USED_ZSET)

        timer.row("row 1b: DPoP proof on the fast path")
        run_dpop_fast_path(client, FAST_USERS, report, sizes.loop_reps, sizes.loop_seconds)
        cluster.redis.delete(AUDIT_STREAM, USED_ZSET)

        timer.row("row 1c: async client fast path")
        run_async_fast_path(cluster, client, report, sizes.loop_reps, sizes.loop_seconds)
        cluster.redis.delete(AUDIT_STREAM, USED_ZSET)

        timer.row("row 3: miss path")
        noop_rate, noop_p50 = measure_noop(cluster, client, report, sizes.miss_threads, sizes.noop_count,
                                           sizes.reps)
        report.note(f"Row 3: no-op Celery round trip (send + wait through the client's result listener): "
                    f"{noop_rate:,.0f}/s with {sizes.miss_threads} callers, {ms(noop_p50)} p50 for a single caller.")
        run_miss_path(cluster, client, report, iter(pool), reps=sizes.reps, pairs=sizes.miss_pairs,
                      threads=sizes.miss_threads, workers=sizes.workers, concurrency=sizes.concurrency,
                      noop_rate=noop_rate)

        timer.row("row 4: burst")
        run_burst(cluster, report, iter(burst_users), reps=sizes.reps, callers=sizes.burst_callers,
                  processes=sizes.burst_processes, latency_ms=50, noop_p50=noop_p50)
        cluster.redis.delete(AUDIT_STREAM, USED_ZSET)

        timer.row("row 2: HTTP API")
        api_hwm = None
        if importlib.util.find_spec("workers.api.app") is None:
            report.add("2", "HTTP resolve", "not run: workers/api/app.py is missing", "", "", False)
        else:
            api_url = cluster.start_api()
            api_start = vm_hwm_kib(cluster.procs["api"].pid)
            run_http(cluster, api_url, report, FAST_USERS, reps=sizes.loop_reps, seconds=sizes.loop_seconds)
            api_hwm = (api_start, vm_hwm_kib(cluster.procs["api"].pid))
            cluster.stop_proc("api")
        cluster.redis.delete(AUDIT_STREAM, USED_ZSET)

        timer.row("row 6: proactive refresh")
        run_refresh(cluster, client, report, pool[:sizes.refresh_users], lifetime=sizes.refresh_lifetime,
                    seconds=sizes.refresh_seconds, threads=4, sweep_seconds=1.0,
                    latency_ms=args.refresh_latency_ms)

        timer.row("row 9: refresh backlog")
        run_backlog(cluster, client, report, pool[:3 * sizes.backlog_pairs], queued=sizes.backlog_queued, threads=4)

        timer.row("row 8: isolation from a hung server")
        run_isolation(cluster, client, report, hung, pool[:5 * sizes.iso_pairs], due=sizes.iso_due, threads=4)
        hung.stop()  # its connections close: the hung calls end at once

        timer.row("row 7: memory, then shutdown")
        end_hwm = _worker_hwm(cluster, workers)
        report.add("7", "peak RSS, worker process (largest of parents and prefork children)",
                   _mib(end_hwm), f"at start-up: {_mib(start_hwm)}")
        if api_hwm is not None:
            report.add("7", "peak RSS, API process", _mib(api_hwm[1]), f"at start-up: {_mib(api_hwm[0])}")
        else:
            report.add("7", "peak RSS, API process", "not run: workers/api/app.py is missing")
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()
        if sandbox is not None:
            sandbox.stop()
        redis_service.stop()
        hung.stop()

    timer.row("row 5: due scan")
    with_pg = bool(pg) and time.monotonic() + SCAN_SECONDS + PG_SCAN_EXTRA_SECONDS < deadline
    run_scan(report, workdir, sizes=list(sizes.scan_sizes), due=sizes.scan_due, runs=sizes.scan_runs,
             pg_admin_url=pg_admin if with_pg else None)
    timer.row("")
    report.note("Wall time by step: " + ", ".join(f"{k.split(':')[0]} {v:.0f} s" for k, v in timer.times.items()) + ".")
    report.rows.sort(key=lambda r: (int(r.section.rstrip("abcdefgh")), r.section))
    elapsed = time.monotonic() - started
    text = report.markdown("credential-broker benchmark" + (" (smoke)" if args.smoke else ""), elapsed)
    print(text)
    if out is not None:
        out.write_text(text)
        _log(f"wrote {out}")
    if args.keep:
        _log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


class _Timer:
    """Wall time of each row, for the notes: the full run must stay within 5 minutes."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._name = ""
        self._t0 = 0.0

    def row(self, name: str) -> None:
        now = time.monotonic()
        if self._name:
            self.times[self._name] = now - self._t0
        self._name, self._t0 = name, now
        if name:
            _log(name)


def _worker_hwm(cluster: BenchCluster, names: list[str]) -> int:
    peaks = [vm_hwm_kib(pid) for name in names for pid in cluster.pids(name)]
    return max((p for p in peaks if p is not None), default=0)


def _mib(kib: int | None) -> str:
    return "n/a" if not kib else f"{kib / 1024:.0f} MiB"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
