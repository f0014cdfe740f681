"""Row 6: proactive refresh under steady load, beat on.

Many users with short-lived credentials are resolved steadily; the beat must
renew each credential between its refresh point and the end of its cache
life, so callers stay on the fast path, and each credential must cost one
provider call for its successor (no duplicate renewals).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import func, select

from broker.db import credentials as T
from workers.common.metrics import METRICS

from .report import Report, pct
from .stats import median, run_batch

__all__ = ["run_refresh"]

SERVER = "rf"


def _counts() -> tuple[float, float]:
    fast = METRICS.value("credbroker_resolves_total", outcome="ok", path="fast")
    flight = METRICS.value("credbroker_resolves_total", outcome="ok", path="flight")
    return fast, flight


def _writes(cluster: Any, server_key: str) -> int:
    """Credential writes so far for the server: every renewal that lands bumps the row's version."""
    with cluster.store.engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(T.c.version), 0))
                                .where(T.c.server_key == server_key)).scalar_one())


def run_refresh(cluster: Any, client: Any, report: Report, users: list[str], *, lifetime: int, seconds: float,
                threads: int, sweep_seconds: float, latency_ms: int) -> None:
    s = cluster.settings
    cluster.sandbox.configure(access_token_ttl=lifetime)
    cluster.sandbox.set_latency(latency_ms)
    cluster.start_beat()
    seen: dict[str, set[int]] = {u: set() for u in users}
    try:
        first: dict[str, int] = {}

        def warm(user: str) -> None:
            first[user] = hash(client.resolve(user, SERVER, timeout=120).value.reveal())

        run_batch(warm, users, 32)
        for u in users:
            seen[u].add(first[u])
        calls_before = cluster.sandbox.token_calls()
        server_key = client.servers.get_server(SERVER).key
        writes_before = _writes(cluster, server_key)
        errors: list[str] = []
        stop = threading.Event()
        slices = [users[i::threads] for i in range(threads)]

        def steady(batch: list[str]) -> None:
            while not stop.is_set():
                sweep_start = time.monotonic()
                for u in batch:
                    try:
                        seen[u].add(hash(client.resolve(u, SERVER, timeout=60).value.reveal()))
                    except Exception as exc:  # noqa: BLE001
                        errors.append(getattr(exc, "code", type(exc).__name__))
                    if stop.is_set():
                        return
                stop.wait(max(0.0, sweep_seconds - (time.monotonic() - sweep_start)))

        marks = [_counts()]
        pool = [threading.Thread(target=steady, args=(b,), daemon=True) for b in slices]
        started = time.monotonic()
        for t in pool:
            t.start()
        for third in (1, 2, 3):
            time.sleep(max(0.0, started + seconds * third / 3 - time.monotonic()))
            marks.append(_counts())
        stop.set()
        for t in pool:
            t.join(120)
        run_seconds = time.monotonic() - started
        # Let renewals already scheduled land, then look once more at every user's current credential.
        cluster.stop_proc("beat")
        time.sleep(s.refresh_jitter_seconds + 1.5)
        for u in users:
            seen[u].add(hash(client.resolve(u, SERVER, timeout=60).value.reveal()))
        calls = cluster.sandbox.token_calls() - calls_before
        written = _writes(cluster, server_key) - writes_before
    finally:
        cluster.stop_proc("beat")
        cluster.sandbox.set_latency(0)
        cluster.sandbox.configure(access_token_ttl=3600)
    shares = []
    for a, b in zip(marks, marks[1:]):
        fast, flight = b[0] - a[0], b[1] - a[1]
        shares.append(fast / (fast + flight) if fast + flight else float("nan"))
    fast, flight = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    total = fast + flight + len(errors)
    share = fast / total if total else float("nan")
    renewed = sum(len(v) - 1 for v in seen.values())
    per_write = calls / written if written else float("nan")
    per_lifetime = calls / (len(users) * run_seconds / lifetime)
    point = min(lifetime - s.near_expiry_seconds, lifetime * s.refresh_fraction)
    report.add("6", f"proactive refresh, {len(users):,} users, {lifetime} s credentials, {run_seconds:.0f} s: "
               "answered on the fast path", pct(share, 2), f"{int(total):,} resolves, {int(flight):,} waited on a flight",
               "≥ 99.9%", share >= 0.999 and not errors)
    report.add("6", "proactive refresh: provider calls per credential lifetime", f"{per_write:.3f}",
               f"{calls:,} calls, {written:,} credentials stored", "1.0", abs(per_write - 1.0) <= 0.01)
    report.add("6", "proactive refresh: provider calls per user per wall-clock lifetime", f"{per_lifetime:.2f}",
               f"{lifetime / point:.2f} if renewed exactly at the refresh point ({point:g} s of {lifetime} s)")
    report.note(f"Row 6: fast-path share per third of the run: {', '.join(pct(x, 2) for x in shares)} "
                f"(median {pct(median(shares), 2)}); errors: {len(errors)}; renewed credentials callers saw: "
                f"{renewed:,}. Refresh point min({lifetime} s - NEAR_EXPIRY {s.near_expiry_seconds:g} s, "
                f"REFRESH_FRACTION {s.refresh_fraction:g} x {lifetime} s) = {point:g} s, cache until "
                f"{lifetime - s.near_expiry_seconds:g} s; beat scan every {s.refresh_scan_seconds:g} s, jitter "
                f"{s.refresh_jitter_seconds:g} s; provider latency {latency_ms} ms; each user resolved about every "
                f"{sweep_seconds:g} s by {threads} threads. 'Per credential lifetime' = provider calls / credential "
                "writes (each renewal that lands bumps the record's version), so a duplicate or wasted renewal "
                "shows above 1.0; per wall-clock lifetime the floor is lifetime / refresh point, since a credential "
                "is renewed before it expires. Sustaining this row takes "
                f"{len(users) / point:,.0f} renewals/s.")
