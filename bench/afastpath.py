"""Row 1c: the fast path through AsyncBrokerClient beside the sync BrokerClient.

One event loop keeps ``TASKS`` resolves in flight at once (what an asyncio
gateway does under load); the sync client runs the same resolves from
``THREADS`` threads. Same users, same cached credentials, same process, loops
interleaved. Standalone (a cluster of its own, prints the rows)::

    python -m bench.afastpath [--seconds 2] [--reps 3] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.client import AsyncBrokerClient

from .fastpath import FAST_USERS
from .report import Report, ms, rate
from .stats import LoopResult, median_result, percentile, run_loop

__all__ = ["run_async_fast_path", "TASKS", "THREADS"]

TASKS = 64
THREADS = 8


async def _loop(client: AsyncBrokerClient, tasks: int, seconds: float) -> LoopResult:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def one(index: int) -> None:
        i = 0
        while True:
            t0 = time.perf_counter()
            await client.resolve(FAST_USERS[(index + i) % len(FAST_USERS)], "tx")
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            i += 1
            if t1 >= stop_at:
                return

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(tasks)))
    elapsed = time.perf_counter() - started
    return LoopResult(percentile(latencies, 50), percentile(latencies, 99), len(latencies) / elapsed,
                      len(latencies))


def run_async_fast_path(cluster: Any, client: Any, report: Report, reps: int, seconds: float) -> float:
    """Adds the rows; returns async/sync throughput. ``client``: a sync client
    whose cache for ``FAST_USERS`` row 1 (or this function) filled."""
    for user in FAST_USERS:
        client.resolve(user, "tx", timeout=60)

    async def measure() -> tuple[list[LoopResult], list[LoopResult]]:
        aresults: list[LoopResult] = []
        sresults: list[LoopResult] = []
        async with AsyncBrokerClient(settings=cluster.settings) as aclient:
            await aclient.resolve(FAST_USERS[0], "tx", timeout=60)  # opens the pool
            for _ in range(reps):  # interleaved, so drift on a noisy machine hits both alike
                aresults.append(await _loop(aclient, TASKS, seconds))
                sresults.append(run_loop(lambda t, i: client.resolve(FAST_USERS[(t + i) % len(FAST_USERS)], "tx"),
                                         THREADS, seconds))
        return aresults, sresults

    aresults, sresults = asyncio.run(measure())
    a, s = median_result(aresults), median_result(sresults)
    ratio = a.rate / s.rate if s.rate else float("nan")
    report.add("1c", f"async fast-path resolve, {TASKS} tasks in one loop: throughput",
               rate(a.rate, " resolves/s"), f"sync client, {THREADS} threads: {rate(s.rate)}",
               "", None)
    report.add("1c", f"async fast-path resolve, {TASKS} tasks: p50 / p99", f"{ms(a.p50)} / {ms(a.p99)}",
               f"sync {ms(s.p50)} / {ms(s.p99)}")
    report.note(f"Row 1c: AsyncBrokerClient (redis.asyncio) vs BrokerClient in one process: async/sync "
                f"throughput {ratio:.2f}x; {reps} interleaved repetitions of {seconds:g} s per figure.")
    return ratio


def main() -> None:
    from .__main__ import DEFAULT_REDIS
    from .cluster import BenchCluster, RedisService, Sandbox

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS,
                        help="used if it answers, else a private redis-server is started")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="credbroker-abench-"))
    redis_service = RedisService(args.redis_url, workdir)
    sandbox = Sandbox(workdir)
    cluster = BenchCluster(workdir, redis_service.url, sandbox)
    client = None
    try:
        cluster.start_workers(1, 2)
        cluster.sign_in(FAST_USERS)
        client = cluster.client()
        report = Report(smoke=False)
        run_async_fast_path(cluster, client, report, args.reps, args.seconds)
        for r in report.rows:
            print(f"| {r.section} | {r.measure} | {r.result} | {r.floor} |")
        for n in report.notes:
            print(n)
    finally:
        if client is not None:
            client.close()
        cluster.stop()
        sandbox.stop()
        redis_service.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
