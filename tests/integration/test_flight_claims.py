"""Claims and the flight guard on real Redis: take, confirm, supersede, lose."""

from __future__ import annotations

import pytest
import redis

from tests.cluster import wait_for
from workers.flight import Claims, FlightGuard, new_task_id

pytestmark = pytest.mark.integration


@pytest.fixture
def claims(redis_url: str):  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_url)
    yield Claims(client)
    client.close()


def test_claim_release_is_compare_and_delete(claims: Claims) -> None:
    key = "credbroker-test:flight:" + new_task_id()
    a, b = new_task_id(), new_task_id()
    assert claims.claim(key, a, 5000) and not claims.claim(key, b, 5000)
    assert claims.holder(key) == a
    assert claims.release(key, b) is False and claims.holder(key) == a
    assert claims.release(key, a) is True and claims.holder(key) is None


def test_guard_confirms_its_own_claim_and_a_superseded_task_stands_down(claims: Claims) -> None:
    key = "credbroker-test:flight:" + new_task_id()
    mine, other = new_task_id(), new_task_id()
    claims.claim(key, mine, 30000)
    guard = FlightGuard(claims, key, mine, ttl_ms=600)
    assert guard.enter() and guard.holds()
    assert 0 < claims.client.pttl(key) <= 600  # now on the heartbeat's TTL
    assert FlightGuard(claims, key, other).enter() is False  # a redelivered copy of another flight
    wait_for(lambda: claims.client.pttl(key) > 0 and guard.holds(), 2)
    # someone else takes the pair (our claim expired meanwhile): the guard notices and stays lost
    claims.client.set(key, other, px=5000)
    wait_for(lambda: not guard.holds(), 3, what="the guard to notice it lost the claim")
    claims.client.set(key, mine, px=5000)
    assert not guard.holds()
    guard.exit()
    claims.release(key, mine)


def test_claims_are_per_execution(claims: Claims) -> None:
    key = "credbroker-test:flight:" + new_task_id()
    task = new_task_id()
    assert claims.claim(key, task, 30000)  # the sender's claim: the bare task id
    first = FlightGuard(claims, key, task, ttl_ms=3000)
    copy = FlightGuard(claims, key, task, ttl_ms=3000)  # a redelivered copy of the same task id
    assert first.enter()
    assert claims.value(key) == first.value and first.value.startswith(task + "/")
    assert claims.holder(key) == task  # joiners still find the task id
    assert copy.enter() is False  # another execution of this task id runs: stand down
    assert claims.release(key, copy.value) is False and claims.value(key) == first.value
    assert claims.extend(key, copy.value, 3000) is False
    assert claims.release(key, first.value) is True and claims.holder(key) is None
    first.exit()
    # a caller done with a finished task frees its claim whichever execution holds it
    other = new_task_id()
    assert claims.claim(key, other, 30000)
    run = FlightGuard(claims, key, other, ttl_ms=3000)
    assert run.enter()
    assert claims.release(key, other + "x") is False
    assert claims.release(key, other) is True and claims.holder(key) is None
    run.exit()
