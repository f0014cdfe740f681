"""Row 4: a burst of concurrent callers, in several processes, on one cold pair.

Single-flight must turn the whole burst into one provider call; every caller
waits about one provider round trip plus one Celery round trip.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from .report import Report, ms
from .stats import median, percentile

__all__ = ["run_burst"]


class _Callers:
    """The burst caller processes, kept for every repetition."""

    def __init__(self, cluster: Any, processes: int) -> None:
        self.procs = [cluster.spawn(f"burst{i}", ["-m", "bench.burst_proc"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE) for i in range(processes)]
        for p in self.procs:
            if json.loads(self._read(p)).get("ready") is not True:
                raise RuntimeError("burst caller did not start")

    @staticmethod
    def _read(proc: subprocess.Popen[bytes]) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError("burst caller exited; see its log")
        return line

    def burst(self, user: str, server: str, threads: int, start_in: float, timeout: float) -> list[dict[str, Any]]:
        start_at = time.time() + start_in
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write((json.dumps({"user": user, "server": server, "threads": threads, "start_at": start_at,
                                       "timeout": timeout}) + "\n").encode())
            p.stdin.flush()
        return [json.loads(self._read(p)) for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            p.wait(timeout=30)


def run_burst(cluster: Any, report: Report, users: Iterator[str], *, reps: int, callers: int, processes: int,
              latency_ms: int, noop_p50: float) -> None:
    per_proc = callers // processes
    cluster.sandbox.set_latency(latency_ms)
    group = _Callers(cluster, processes)
    try:
        # Warm-up: each process opens its Redis connections and result listener on a pair of its own.
        warm = next(users)
        group.burst(warm, "tx", per_proc, 1.0, 60)
        p50s, p99s, calls, errors, flights = [], [], [], [], []
        for _ in range(reps):
            user = next(users)
            before = cluster.sandbox.token_calls(user)
            replies = group.burst(user, "tx", per_proc, 1.0, 60)
            waits = [w for r in replies for w in r["waits"]]
            errors += [e for r in replies for e in r["errors"]]
            flights.append(sum(r["started"] for r in replies))
            calls.append(cluster.sandbox.token_calls(user) - before)
            p50s.append(percentile(waits, 50))
            p99s.append(percentile(waits, 99))
    finally:
        group.close()
        cluster.sandbox.set_latency(0)
    floor = latency_ms / 1000 + noop_p50
    floor_text = f"{latency_ms} ms provider + {ms(noop_p50)} no-op round trip = {ms(floor)}"
    report.add("4", f"burst, {per_proc * processes} callers / {processes} processes: provider calls",
               " ".join(str(c) for c in calls) + " (per repetition)", "1", "exactly 1",
               all(c == 1 for c in calls) and not errors)
    report.add("4", "burst: caller wait p50", ms(median(p50s)), floor_text)
    report.add("4", "burst: caller wait p99", ms(median(p99s)), floor_text)
    if errors:
        report.note(f"Row 4: errors during the burst: {sorted(set(errors))} ({len(errors)} callers)")
    report.note(f"Row 4: {reps} repetitions, each on a fresh cold pair; flights started per burst: "
                f"{flights} (the rest joined); waits measured from the common start instant, so they include "
                "waking the caller threads.")
