"""The refresh scan's budget and send plan (pure)."""

from __future__ import annotations

from workers.refresh_scan import plan_sends, refresh_expires_seconds, scan_budget


def test_budget_is_what_the_workers_can_start_minus_what_is_queued() -> None:
    assert scan_budget(slots=4, started_since_last=0, queued=0) == 4  # nothing measured yet: the slots
    assert scan_budget(slots=4, started_since_last=50, queued=0) == 100  # fast workers: grow with them
    assert scan_budget(slots=4, started_since_last=50, queued=60) == 40
    assert scan_budget(slots=4, started_since_last=1, queued=9) == 0  # the backlog is enough


def test_plan_skips_open_circuits_and_stops_at_the_budget() -> None:
    due = [("u1", "hung"), ("u1", "ok"), ("u2", "hung"), ("u2", "ok"), ("u3", "ok"), ("u4", "ok")]
    asked: list[str] = []

    def is_open(key: str) -> bool:
        asked.append(key)
        return key == "hung"

    plan = plan_sends(due, 3, is_open)
    assert plan.pairs == [("u1", "ok"), ("u2", "ok"), ("u3", "ok")]
    assert (plan.skipped_open, plan.over_budget) == (2, 1)
    assert sorted(asked) == ["hung", "ok"]  # one breaker read per server per scan


def test_queued_refreshes_expire_after_a_few_scans() -> None:
    assert refresh_expires_seconds(5) == 60
    assert refresh_expires_seconds(30) == 300
