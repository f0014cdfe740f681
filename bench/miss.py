"""Row 3: the miss path, cold resolves of distinct (user, server) pairs.

Beside it, the same caller threads doing no-op Celery round trips on the same
workers (send, then wait through the client's own result listener), and at
provider latency L the slot ceiling workers x concurrency / L.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from workers.common.flight import new_task_id
from workers.common.metrics import METRICS

from .celery_bench import NOOP
from .cpu import CpuMeter
from .report import Report, ms, rate
from .stats import BatchResult, median, run_batch

__all__ = ["noop_round_trip", "measure_noop", "run_miss_path"]


def noop_round_trip(client: Any, timeout: float = 60) -> None:
    """One no-op task: sent like a flight, waited for like a flight."""
    task_id = new_task_id()
    client.celery.send_task(NOOP, task_id=task_id)
    meta = client.waiter.wait(task_id, time.monotonic() + timeout, lambda: True)
    if meta is None or meta.get("status") != "SUCCESS":
        raise RuntimeError("no-op task did not succeed")


def measure_noop(cluster: Any, client: Any, report: Report, threads: int, count: int,
                 reps: int) -> tuple[float, float]:
    """(median no-op rate with ``threads`` callers, median single-caller round trip in seconds)."""
    rates, singles = [], []
    meter = CpuMeter(cluster)
    for rep in range(reps):
        meter.start()
        rates.append(run_batch(lambda _i: noop_round_trip(client), range(count), threads).rate)
        if rep == 0:
            report.note("Row 3: " + meter.describe("CPU ms per no-op task", meter.stop(count)))
        singles.append(run_batch(lambda _i: noop_round_trip(client), range(max(10, count // 10)), 1).p50)
    return median(rates), median(singles)


def _pairs(users: Iterator[str], count: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    while len(out) < count:
        user = next(users)
        out += [(user, "tx"), (user, "obo")]
    return out[:count]


def run_miss_path(cluster: Any, client: Any, report: Report, users: Iterator[str], *, reps: int, pairs: int,
                  threads: int, workers: int, concurrency: int, noop_rate: float) -> None:
    """Cold acquisitions at provider latency 0 and 50 ms, beside their floors."""
    slots = workers * concurrency
    meter = CpuMeter(cluster)
    for latency_ms in (0, 50):
        cluster.sandbox.set_latency(latency_ms)
        results: list[BatchResult] = []
        for rep in range(reps):
            batch = _pairs(users, pairs)
            meter.start()
            calls_before = cluster.sandbox.token_calls()
            flights_before = METRICS.value("credbroker_resolves_total", outcome="ok", path="flight")
            results.append(run_batch(lambda p: client.resolve(p[0], p[1], timeout=120), batch, threads))
            flights = METRICS.value("credbroker_resolves_total", outcome="ok", path="flight") - flights_before
            if rep == 0:
                report.note("Row 3: " + meter.describe(f"CPU ms per acquisition at {latency_ms} ms",
                                                       meter.stop(len(batch))))
            calls = cluster.sandbox.token_calls() - calls_before
            if flights != len(batch) or calls != len(batch):
                raise RuntimeError(f"miss path: {len(batch)} pairs but {flights} flights, {calls} provider calls")
        acq = median([r.rate for r in results])
        p50 = median([r.p50 for r in results])
        if latency_ms == 0:
            floor, floor_text = noop_rate, f"no-op task {rate(noop_rate)}"
        else:
            ceiling = slots / (latency_ms / 1000)
            floor = min(noop_rate, ceiling)
            floor_text = f"no-op task {rate(noop_rate)}; {workers}x{concurrency} slots / {latency_ms} ms = {rate(ceiling)}"
        report.add("3", f"miss path, provider {latency_ms} ms: acquisitions", rate(acq, " acq/s"), floor_text,
                   "≥ 70% of lower floor", acq >= 0.7 * floor)
        report.add("3", f"miss path, provider {latency_ms} ms: caller wait p50", ms(p50),
                   f"{threads} callers")
    cluster.sandbox.set_latency(0)
    report.note(f"Row 3: {reps} repetitions of {pairs} never-seen (user, server) pairs each, from {threads} "
                f"caller threads in one BrokerClient process; {workers} workers x {concurrency} prefork "
                "children; every pair checked to cost exactly one flight and one provider call.")
