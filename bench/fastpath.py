"""Row 1: the fast path through BrokerClient beside a raw redis-py GET.

The GET reads a random value exactly as long as the sealed cache entry,
through a client built by the same ``workers.common.runtime.redis_client`` the
BrokerClient uses, so the difference is the broker's own work: validation,
AES-GCM open, envelope parsing, policy, buffered audit, use marks, metrics.
"""

from __future__ import annotations

import os
from typing import Any

from workers.common.constants import cache_key
from workers.common.metrics import METRICS
from workers.common.runtime import redis_client

from .cpu import CpuMeter
from .report import Report, ms, rate
from .stats import LoopResult, median_result, run_loop

__all__ = ["run_fast_path", "FAST_USERS"]

FAST_USERS = [f"fast-{i}" for i in range(8)]


def _fast_count() -> float:
    return METRICS.value("credbroker_resolves_total", outcome="ok", path="fast")


def run_fast_path(cluster: Any, client: Any, report: Report, reps: int, seconds: float) -> dict[str, LoopResult]:
    for user in FAST_USERS:  # one flight each, then every resolve below is a cache hit
        client.resolve(user, "tx", timeout=60)
    server = client.servers.get_server("tx")
    size = len(cluster.redis.get(cache_key(FAST_USERS[0], server.key)))
    raw = redis_client(cluster.settings)
    raw_keys = [f"bench:raw:{i}" for i in range(len(FAST_USERS))]
    for key in raw_keys:
        raw.set(key, os.urandom(size))
    out: dict[str, LoopResult] = {}
    meter = CpuMeter(cluster)
    cpu: dict[str, dict[str, float]] = {}
    for threads in (1, 8):
        gets: list[LoopResult] = []
        resolves: list[LoopResult] = []
        for rep in range(reps):  # interleaved, so drift on a noisy machine hits both alike
            meter.start()
            gets.append(run_loop(lambda t, i: raw.get(raw_keys[(t + i) % len(raw_keys)]), threads, seconds))
            if rep == 0 and threads == 1:
                cpu["GET"] = meter.stop(gets[-1].count)
            before = _fast_count()
            meter.start()
            resolved = run_loop(lambda t, i: client.resolve(FAST_USERS[(t + i) % len(FAST_USERS)], "tx"),
                                threads, seconds)
            if rep == 0 and threads == 1:
                cpu["resolve"] = meter.stop(resolved.count)
            if _fast_count() - before != resolved.count:
                raise RuntimeError("a fast-path resolve left the fast path")
            resolves.append(resolved)
        get, res = median_result(gets), median_result(resolves)
        out[f"get{threads}"], out[f"resolve{threads}"] = get, res
        label = f"{threads} thread" + ("s" if threads > 1 else "")
        report.add("1", f"fast-path resolve, {label}: p50", ms(res.p50), f"GET {ms(get.p50)}",
                   "≤ 2x GET", res.p50 <= 2 * get.p50)
        report.add("1", f"fast-path resolve, {label}: p99", ms(res.p99), f"GET {ms(get.p99)}")
        report.add("1", f"fast-path resolve, {label}: throughput", rate(res.rate, " resolves/s"),
                   f"GET loop {rate(get.rate)}", "≥ 0.5x GET", res.rate >= 0.5 * get.rate)
    raw.delete(*raw_keys)
    raw.close()
    report.note("Row 1: CPU µs per operation, 1 thread (driver process, where the client and its audit thread "
                "run; Redis): " + "; ".join(f"{k}: driver {1000 * v['driver']:.0f}, Redis {1000 * v.get('redis', 0):.0f}"
                                            for k, v in cpu.items()))
    report.note(f"Row 1: sealed cache entry {size} bytes; raw GET of {size} random bytes through "
                f"workers.common.runtime.redis_client; {reps} interleaved repetitions of {seconds:g} s per figure; "
                "the client's audit flush thread runs during the resolve loops, as in production.")
    return out
