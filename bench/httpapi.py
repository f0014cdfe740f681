"""Row 2: the HTTP API's resolve on the fast path, beside a trivial endpoint
served by the same process and stack (uvicorn + starlette), both through
keep-alive ``httpx.Client`` connections."""

from __future__ import annotations

from typing import Any

import httpx

from .report import Report, ms, rate
from .stats import LoopResult, median_result, run_loop

__all__ = ["run_http"]

TRIVIAL = "/healthz"


def run_http(cluster: Any, api_url: str, report: Report, users: list[str], *, reps: int, seconds: float,
             thread_counts: tuple[int, ...] = (1, 4)) -> None:
    headers = {"Authorization": f"Bearer {cluster.api_key}"}
    clients = [httpx.Client(base_url=api_url, headers=headers, timeout=60) for _ in range(max(thread_counts))]
    bodies = [{"user_id": u, "server": "tx"} for u in users]

    def resolve(t: int, i: int) -> None:
        r = clients[t].post("/v1/resolve", json=bodies[(t + i) % len(bodies)])
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/resolve: {r.status_code} {r.text[:200]}")

    def trivial(t: int, i: int) -> None:
        r = clients[t].get(TRIVIAL)
        if r.status_code != 200:
            raise RuntimeError(f"GET {TRIVIAL}: {r.status_code}")

    try:
        for body in bodies:  # every pair cached before timing
            resolve(0, bodies.index(body))
        for threads in thread_counts:
            res_runs: list[LoopResult] = []
            triv_runs: list[LoopResult] = []
            for _ in range(reps):
                triv_runs.append(run_loop(trivial, threads, seconds))
                res_runs.append(run_loop(resolve, threads, seconds))
            res, triv = median_result(res_runs), median_result(triv_runs)
            label = f"{threads} keep-alive client" + ("s" if threads > 1 else "")
            report.add("2", f"HTTP resolve, {label}: p50", ms(res.p50), f"{TRIVIAL} {ms(triv.p50)}")
            report.add("2", f"HTTP resolve, {label}: p99", ms(res.p99), f"{TRIVIAL} {ms(triv.p99)}")
            report.add("2", f"HTTP resolve, {label}: throughput", rate(res.rate, " req/s"),
                       f"{TRIVIAL} {rate(triv.rate, ' req/s')}", "≥ 0.5x trivial", res.rate >= 0.5 * triv.rate)
    finally:
        for c in clients:
            c.close()
    report.note(f"Row 2: the API in its own process (workers.api.app.serve_api); {reps} interleaved repetitions "
                f"of {seconds:g} s per figure; each client thread has its own httpx.Client.")
