"""Row 1b: what a DPoP proof adds to the fast path.

Interleaved loops, one thread: a plain fast-path resolve of ``tx``; the same
for ``dp`` (DPoP) with ``method`` and ``url``, so each call opens the sealed
envelope with the key in it and signs a fresh ES256 proof in this process;
and the proof signature alone.
"""

from __future__ import annotations

import time
from typing import Any

from broker.dpop import DPoPKey, dpop_proof
from workers.metrics import METRICS

from .report import Report, ms
from .stats import LoopResult, median_result, run_loop

__all__ = ["run_dpop_fast_path", "DPOP_URL"]

DPOP_URL = "https://dp.upstream.test/mcp/tools/call"


def _fast_count() -> float:
    return METRICS.value("credbroker_resolves_total", outcome="ok", path="fast")


def run_dpop_fast_path(client: Any, users: list[str], report: Report, reps: int,
                       seconds: float) -> dict[str, LoopResult]:
    for user in users:  # one flight each (the DPoP-bound mint), then every resolve below is a cache hit
        client.resolve(user, "dp", timeout=60, method="POST", url=DPOP_URL)
    key = DPoPKey.generate()
    token = "x" * 900  # about the size of a sandbox access token
    plain: list[LoopResult] = []
    dpop: list[LoopResult] = []
    sign: list[LoopResult] = []
    for _ in range(reps):  # interleaved, so drift on a noisy machine hits all three alike
        plain.append(run_loop(lambda t, i: client.resolve(users[i % len(users)], "tx"), 1, seconds))
        before = _fast_count()
        dpop.append(run_loop(lambda t, i: client.resolve(users[i % len(users)], "dp", method="POST",
                                                          url=DPOP_URL), 1, seconds))
        if _fast_count() - before != dpop[-1].count:
            raise RuntimeError("a DPoP fast-path resolve left the fast path")
        sign.append(run_loop(lambda t, i: dpop_proof(key, "POST", DPOP_URL, time.time(), access_token=token),
                             1, seconds))
    p, d, s = median_result(plain), median_result(dpop), median_result(sign)
    report.add("1b", "fast-path resolve with a DPoP proof, 1 thread: p50", ms(d.p50),
               f"plain fast path {ms(p.p50)} (x{d.p50 / p.p50:.2f})")
    report.add("1b", "fast-path resolve with a DPoP proof, 1 thread: p99", ms(d.p99), f"plain {ms(p.p99)}")
    report.add("1b", "fast-path resolve with a DPoP proof, 1 thread: throughput", f"{d.rate:,.0f} resolves/s",
               f"plain {p.rate:,.0f}/s (x{d.rate / p.rate:.2f})")
    report.add("1b", "DPoP proof alone (ES256 sign, ath, JSON), 1 thread: p50", ms(s.p50),
               f"{s.rate:,.0f} proofs/s")
    report.note(f"Row 1b: {len(users)} users on `dp` (token_exchange, dpop: true) beside the same users on `tx`; "
                f"each DPoP resolve names POST {DPOP_URL}; median of {reps} interleaved loops of {seconds:g} s.")
    return {"plain": p, "dpop": d, "sign": s}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.dpop``: row 1b alone, on its own small cluster (a private
    Redis unless ``--redis-url`` answers), printed as a table."""
    import argparse
    import shutil
    import tempfile
    from pathlib import Path

    from .cluster import BenchCluster, RedisService, Sandbox
    from .fastpath import FAST_USERS

    parser = argparse.ArgumentParser(prog="python -m bench.dpop", description=main.__doc__)
    parser.add_argument("--smoke", action="store_true", help="short loops")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:1/0",
                        help="Redis to use, its database flushed (default: a private redis-server)")
    args = parser.parse_args(argv)
    reps, seconds = (3, 0.2) if args.smoke else (7, 1.0)
    workdir = Path(tempfile.mkdtemp(prefix="credbroker-bench-dpop-"))
    report = Report(smoke=args.smoke)
    redis_service = RedisService(args.redis_url, workdir)
    sandbox = cluster = client = None
    try:
        sandbox = Sandbox(workdir)
        cluster = BenchCluster(workdir, redis_service.url, sandbox)
        cluster.start_workers(1, 2)
        cluster.sign_in(FAST_USERS)
        client = cluster.client()
        for user in FAST_USERS:
            client.resolve(user, "tx", timeout=60)
        run_dpop_fast_path(client, FAST_USERS, report, reps, seconds)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()
        if sandbox is not None:
            sandbox.stop()
        redis_service.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(report.markdown("credential-broker benchmark, row 1b" + (" (smoke)" if args.smoke else ""), 0.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
