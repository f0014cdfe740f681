"""Row 9: a refresh backlog does not delay interactive resolves.

10,000 ``broker.refresh`` tasks are put on the refresh queue at once (the
beat's budget never queues that many; this is the worst case a burst or a
stalled refresh worker pool could leave), then cold resolves (a mint each,
sandbox at 20 ms) and cached resolves (users whose credential is valid and
not due) are timed while the backlog drains, beside the same resolves with
both queues empty. The refreshes are real tasks for pairs with
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
    third = len(users) // 3
    cold_idle, cold_loaded, cached = users[:third], users[third:2 * third], users[2 * third:]
    cluster.sandbox.set_latency(latency_ms)
    try:
        run_batch(lambda u: client.resolve(u, SERVER, timeout=60), cached, threads)  # now cached, not due
        hits = cached * 10
        idle_hits = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), hits, threads)
        idle = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), cold_idle, threads)
        # The workers stop taking refreshes while the backlog is written, so all of it is queued
        # when the timed resolves begin (the drain would otherwise eat it during the sends).
        control = client.celery.control
        control.cancel_consumer(REFRESH_QUEUE, reply=True, timeout=5)
        try:
            with client.celery.producer_or_acquire() as producer:
                for i in range(queued):
                    client.celery.send_task(TASK_REFRESH, args=[f"backlog-{i:05d}", SERVER],
                                            task_id=new_task_id(), expires=300, producer=producer)
        finally:
            control.add_consumer(REFRESH_QUEUE, reply=True, timeout=5)
        depth_before = int(cluster.redis.llen(REFRESH_QUEUE))
        loaded = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), cold_loaded, threads)
        loaded_hits = run_batch(lambda u: client.resolve(u, SERVER, timeout=60), hits, threads)
        depth_after = int(cluster.redis.llen(REFRESH_QUEUE))
    finally:
        cluster.redis.delete(REFRESH_QUEUE)  # the rest of the backlog is not needed
        cluster.sandbox.set_latency(0)
    ratio = loaded.p99 / idle.p99
    hit_ratio = loaded_hits.p99 / idle_hits.p99
    report.add("9", f"cold resolve (a mint: no credential yet) p99 with {queued:,} refreshes queued", f"{ratio:.2f}x",
               f"{ms(loaded.p99)} vs {ms(idle.p99)} with the queues empty", "≤ 2x", ratio <= 2.0)
    report.add("9", f"cached resolve (a valid credential, not due) p99 with {queued:,} refreshes queued",
               f"{hit_ratio:.2f}x", f"{ms(loaded_hits.p99)} vs {ms(idle_hits.p99)} with the queues empty", "≤ 2x",
               hit_ratio <= 2.0)
    report.note(f"Row 9: {third} cold resolves and {len(hits)} cached resolves per phase from {threads} threads, "
                f"provider latency {latency_ms} ms; "
                f"p50 {ms(idle.p50)} idle, {ms(loaded.p50)} with the backlog; refresh queue depth "
                f"{depth_before:,} when the timed resolves began and {depth_after:,} when they ended (the workers "
                "take the resolve queue first: queue_order_strategy sorted).")
