"""Small measurement helpers: percentiles, medians of repetitions, timed loops."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["percentile", "median", "LoopResult", "run_loop", "median_result", "BatchResult", "run_batch"]

Item = TypeVar("Item")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(frozen=True)
class LoopResult:
    """One timed run: latency percentiles (seconds) and operations per second."""

    p50: float
    p99: float
    rate: float
    count: int


def _run_pool(pool: list[threading.Thread], barrier: threading.Barrier, errors: list[BaseException],
              before_release: Callable[[], object] | None = None) -> float:
    """Start the threads, release them together at the barrier, wait: seconds taken.
    A worker's exception is raised here."""
    for t in pool:
        t.start()
    if before_release is not None:
        before_release()
    started = time.perf_counter()
    barrier.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def run_loop(op: Callable[[int, int], object], threads: int, seconds: float) -> LoopResult:
    """Call ``op(thread_index, i)`` back to back from ``threads`` threads for
    ``seconds``; every call is timed."""
    samples: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    stop_at = [0.0]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        lat = samples[index]
        barrier.wait()
        clock = time.perf_counter
        i = 0
        try:
            while True:
                t0 = clock()
                op(index, i)
                t1 = clock()
                lat.append(t1 - t0)
                i += 1
                if t1 >= stop_at[0]:
                    return
        except BaseException as exc:  # noqa: BLE001 - surfaced to the caller below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]

    def set_stop() -> None:
        stop_at[0] = time.perf_counter() + seconds

    elapsed = _run_pool(pool, barrier, errors, before_release=set_stop)
    flat = [x for lat in samples for x in lat]
    return LoopResult(percentile(flat, 50), percentile(flat, 99), len(flat) / elapsed, len(flat))


def median_result(results: Sequence[LoopResult]) -> LoopResult:
    """Each figure's median over the repetitions."""
    return LoopResult(
        median([r.p50 for r in results]),
        median([r.p99 for r in results]),
        median([r.rate for r in results]),
        int(median([r.count for r in results])),
    )


@dataclass(frozen=True)
class BatchResult:
    """A fixed batch of operations shared by a pool of threads."""

    rate: float
    p50: float
    p99: float
    count: int
    elapsed: float


def run_batch(op: Callable[[Item], object], items: Sequence[Item], threads: int) -> BatchResult:
    """Run ``op(item)`` for every item from ``threads`` threads, as fast as they go."""
    lock = threading.Lock()
    position = [0]
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        mine: list[float] = []
        try:
            while True:
                with lock:
                    i = position[0]
                    position[0] += 1
                if i >= len(items):
                    break
                t0 = time.perf_counter()
                op(items[i])
                mine.append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    elapsed = _run_pool(pool, barrier, errors)
    return BatchResult(len(items) / elapsed, percentile(latencies, 50), percentile(latencies, 99), len(items),
                       elapsed)
