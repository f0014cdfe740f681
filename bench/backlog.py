"""Row 9: a refresh backlog does not delay interactive resolves.

10,000 ``broker.refresh`` tasks are put on the refresh queue at once (the
beat's budget never queues that many; this is the worst case a burst or a
stalled refresh worker pool could leave), then cold resolves (a mint each,
sandbox at 20 ms) are timed while the backlog drains, beside the same
resolves with both queues empty. The refreshes are real tasks for pairs with
no stored credential: each takes the flight claim, reads the store and ends
without a provider call, so the drain is as fast as the broker can go.
"""

from __future__ import annotations

from typing import Any

from workers.celery_app import REFRESH_QUEUE, TASK_REFRESH
from workers.flight import new_task_id

from .report import Report, ms
from .stats import run_batch

__all__ = ["run_backlog", "SERVER"]

SERVER = "bl"


def run_backlog(cluster: Any, client: Any, report: Report, users: list[str], *, queued: int, threads: int,
                latency_ms: int = 20) -> None:
    half = len(users) // 2
    cluster.sandbox.set_latency(latency_ms)
    try:
        idle = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), users[:half], threads)
        with client.celery.producer_or_acquire() as producer:
            for i in range(queued):
                client.celery.send_task(TASK_REFRESH, args=[f"backlog-{i:05d}", SERVER], task_id=new_task_id(),
                                        expires=300, producer=producer)
        depth_before = int(cluster.redis.llen(REFRESH_QUEUE))
        loaded = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), users[half:], threads)
        depth_after = int(cluster.redis.llen(REFRESH_QUEUE))
    finally:
        cluster.redis.delete(REFRESH_QUEUE)  # the rest of the backlog is not needed
        cluster.sandbox.set_latency(0)
    ratio = loaded.p99 / idle.p99
    report.add("9", f"cold resolve p99 with {queued:,} refreshes queued", f"{ratio:.2f}x",
               f"{ms(loaded.p99)} vs {ms(idle.p99)} with the queues empty", "≤ 2x", ratio <= 2.0)
    report.note(f"Row 9: {half} cold resolves per phase from {threads} threads, provider latency {latency_ms} ms; "
                f"p50 {ms(idle.p50)} idle, {ms(loaded.p50)} with the backlog; refresh queue depth "
                f"{depth_before:,} when the timed resolves began and {depth_after:,} when they ended (the workers "
                "take the resolve queue first: queue_order_strategy sorted).")
