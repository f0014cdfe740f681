"""Row 8: a hung server does not slow a healthy one.

A token endpoint that accepts connections and never answers
(``broker.sandbox.hung``) gets ``due`` credentials past their refresh point
and used recently, so the beat keeps sending their renewals, and 6 users
resolve it at once (the issue's reproduction). Meanwhile a healthy server
(``iso``, the sandbox at 20 ms) is asked for cold resolves (a mint each) and
for renewals (a resolve of a stored credential past its refresh point, not
cached). Both are timed the same way without the hung load first; the row
reports each p99 as a ratio to that baseline.

The timed phase starts once the hung server holds its share of the slots and
has hung for ``SETTLE_SECONDS`` (the server is hung, not just becoming so);
the onset is reported apart: during it, calls for the hung server still wait
up to a second for a slot (``workers.upstream_guard.FLOW_SECONDS``), so a
probe thread resolving the healthy server then shows the worst a caller sees.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

from broker.clock import utcnow
from broker.models import Credential, ObtainedVia
from broker.sandbox.hung import HungServer
from broker.secret import Secret
from broker.servers import servers_from_settings
from workers.metrics import render_cluster

from .report import Report, ms
from .stats import BatchResult, run_batch

__all__ = ["run_isolation", "SERVER", "HUNG_SERVER", "put_due"]

SERVER = "iso"
HUNG_SERVER = "hung"
HUNG_CALLERS = 6
SETTLE_SECONDS = 2.0


def put_due(cluster: Any, server: str, users: list[str], *, used: bool, refresh_token: bool = False) -> None:
    """Store a credential past its refresh point (still valid for 10 minutes) for each user."""
    key = servers_from_settings(cluster.settings).get_server(server).key
    now = utcnow()
    for u in users:
        cred = Credential(Secret(f"bench-due-{u}"), ObtainedVia.CONNECT_FLOW if refresh_token else
                          ObtainedVia.TOKEN_EXCHANGE, issued_at=now - timedelta(seconds=3000),
                          expires_at=now + timedelta(seconds=600),
                          refresh_token=Secret(f"bench-rt-{u}") if refresh_token else None)
        cluster.store.put(u, key, cred)
    if used:
        cluster.store.touch_many([(u, key, now) for u in users])


def _measure(client: Any, cold: list[str], renew: list[str], threads: int) -> tuple[BatchResult, BatchResult]:
    resolves = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), cold, threads)
    renewals = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), renew, threads)
    return resolves, renewals


def _circuit(cluster: Any) -> str:
    for line in render_cluster(cluster.redis).splitlines():
        if line.startswith(f'credbroker_server_circuit_state{{server="{HUNG_SERVER}"}}'):
            return {"0": "closed", "1": "open", "2": "half-open"}.get(line.split()[-1], line.split()[-1])
    return "closed"


def run_isolation(cluster: Any, client: Any, report: Report, hung: HungServer, users: list[str], *, due: int,
                  threads: int, latency_ms: int = 20) -> None:
    n = len(users) // 5
    groups = [users[i * n:(i + 1) * n] for i in range(5)]
    cluster.sandbox.set_latency(latency_ms)
    put_due(cluster, SERVER, groups[1] + groups[3], used=False)  # not used: the beat leaves them to resolves
    cluster.start_beat()
    callers: list[threading.Thread] = []
    try:
        base = _measure(client, groups[0], groups[1], threads)

        hung_users = [f"hung-{i:05d}" for i in range(due)]
        put_due(cluster, HUNG_SERVER, hung_users, used=True, refresh_token=True)

        def hung_caller(user: str) -> None:
            try:
                client.resolve(user, HUNG_SERVER, timeout=30)
            except Exception:  # noqa: BLE001 - stale or upstream_error: either is expected here
                pass

        callers = [threading.Thread(target=hung_caller, args=(f"hung-{i:05d}",), daemon=True)
                   for i in range(HUNG_CALLERS)]
        for t in callers:
            t.start()
        onset: list[float] = []
        probe_users = iter(groups[4])

        def probe(until: float) -> None:
            for u in probe_users:
                if time.monotonic() >= until:
                    return
                t0 = time.perf_counter()
                client.resolve(u, SERVER, timeout=60)
                onset.append(time.perf_counter() - t0)

        share = cluster.settings.server_max_concurrency or max(1, cluster.settings.worker_slots // 2)
        deadline = time.monotonic() + 20
        while hung.accepted < share and time.monotonic() < deadline:
            time.sleep(0.02)
        settled = time.monotonic() + SETTLE_SECONDS
        probe(settled)
        time.sleep(max(0.0, settled - time.monotonic()))
        accepted_at_start = hung.accepted
        loaded = _measure(client, groups[2], groups[3], threads)
        circuit = _circuit(cluster)
    finally:
        cluster.stop_proc("beat")
        cluster.sandbox.set_latency(0)
    ratios = [loaded[i].p99 / base[i].p99 for i in range(2)]
    for i, what in enumerate(("cold resolves (a mint each)", "renewals (resolve past the refresh point)")):
        report.add("8", f"isolation: {SERVER} {what} p99, {due:,} credentials of a hung server due",
                   f"{ratios[i]:.2f}x", f"{ms(loaded[i].p99)} vs {ms(base[i].p99)} without the hung server",
                   "≤ 2x", ratios[i] <= 2.0)
    refusals = sum(float(line.split()[-1]) for line in render_cluster(cluster.redis).splitlines()
                   if line.startswith("credbroker_server_refusals_total") and f'server="{HUNG_SERVER}"' in line)
    worst = f"{ms(max(onset))} (of {len(onset)})" if onset else "n/a"
    report.note(f"Row 8: {len(groups[0])} cold resolves and {len(groups[1])} renewals per phase from {threads} "
                f"threads, provider latency {latency_ms} ms, timed from {SETTLE_SECONDS:g} s after the hung server "
                f"held its {share} slots; the slowest healthy resolve of a probe thread during those first "
                f"{SETTLE_SECONDS:g} s: {worst}; p50 {ms(base[0].p50)} -> {ms(loaded[0].p50)} "
                f"(resolves), {ms(base[1].p50)} -> {ms(loaded[1].p50)} (renewals). Hung server: {due:,} due "
                f"credentials, {HUNG_CALLERS} concurrent resolves, beat on; {accepted_at_start} connections "
                f"hanging when the measurement began, {hung.accepted} by its end; {refusals:,.0f} calls refused "
                f"by the broker (server_busy / circuit_open); circuit {circuit} at the end. Per-server limit "
                f"{cluster.settings.server_max_concurrency or max(1, cluster.settings.worker_slots // 2)} of "
                f"{cluster.settings.worker_slots} slots; breaker after {cluster.settings.breaker_failures} "
                f"consecutive transient failures, HTTP read timeout {cluster.settings.http_read_timeout:g} s.")
