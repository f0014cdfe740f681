"""The lease fence in the store, in the database's clock, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from broker.clock import utcnow
from broker.models import CredentialStatus
from broker.store import CredentialStore
from tests.cluster import wait_for
from tests.unit.test_store import cred, store  # noqa: F401 - the store fixture on both databases

K = "k1"


def test_one_owner_at_a_time_in_the_database_clock(store: CredentialStore) -> None:  # noqa: F811
    store.put("alice", K, cred())
    row = store.get("alice", K)
    assert row is not None and row.lease_owner is None
    mine = store.take_lease(row, "flight-a", 30)
    assert mine.taken and not mine.took_over
    held = store.get("alice", K)
    assert held is not None and held.lease_owner == "flight-a"
    # Stored as naive UTC by the database's clock: about now + 30 s in real UTC time.
    assert held.lease_until is not None and abs((held.lease_until - utcnow()) - timedelta(seconds=30)) < timedelta(seconds=5)
    other = store.take_lease(held, "flight-b", 30)
    assert not other.taken and other.current is not None and other.current.lease_owner == "flight-a"
    assert store.take_lease(held, "flight-a", 30).taken  # our own lease: extended
    assert store.release_lease("alice", K, "flight-b") is False  # only the holder releases
    assert store.release_lease("alice", K, "flight-a") is True
    free = store.get("alice", K)
    assert free is not None and free.lease_owner is None and free.lease_until is None
    assert store.take_lease(free, "flight-b", 30).taken


def test_an_expired_lease_is_taken_over_and_says_so(store: CredentialStore) -> None:  # noqa: F811
    store.put("alice", K, cred())
    row = store.get("alice", K)
    assert row is not None and store.take_lease(row, "dead-flight", 0.4).taken
    held = store.get("alice", K)
    assert held is not None and not store.take_lease(held, "next", 30).taken
    take = wait_for(lambda: (t := store.take_lease(held, "next", 30)).taken and t, 5, 0.05, what="lease expiry")
    assert take.took_over  # the previous flight never released: its outcome is unknown


def test_a_stale_observation_takes_nothing(store: CredentialStore) -> None:  # noqa: F811
    store.put("alice", K, cred())
    old = store.get("alice", K)
    assert old is not None
    store.put("alice", K, cred("newer"))  # renewed meanwhile: version moved
    take = store.take_lease(old, "late", 30)
    assert not take.taken and take.current is not None and take.current.version == old.version + 1
    assert take.current.lease_owner is None


def test_the_write_needs_the_lease_and_releases_it(store: CredentialStore) -> None:  # noqa: F811
    store.put("alice", K, cred())
    row = store.get("alice", K)
    assert row is not None and store.take_lease(row, "a", 30).taken
    assert store.compare_and_swap("alice", K, row.version, cred("x"), lease_owner="b") is None
    written = store.compare_and_swap("alice", K, row.version, cred("y"), lease_owner="a")
    assert written is not None
    after = store.get("alice", K)
    assert after is not None and after.lease_owner is None and after.version == row.version + 1


def test_a_status_change_does_not_move_the_fence(store: CredentialStore) -> None:  # noqa: F811
    store.put("alice", K, cred())
    row = store.get("alice", K)
    assert row is not None and store.take_lease(row, "a", 30).taken
    assert store.set_status("alice", K, CredentialStatus.DEGRADED, expected_version=row.version, failure="x")
    # The refresh that read ``row`` still writes its rotated token.
    assert store.compare_and_swap("alice", K, row.version, cred("rotated"), lease_owner="a") is not None


def test_delete_only_the_version_read_under_the_lease(store: CredentialStore) -> None:  # noqa: F811
    store.put("alice", K, cred())
    row = store.get("alice", K)
    assert row is not None and store.take_lease(row, "disconnect", 30).taken
    assert store.delete("alice", K, expected_version=row.version, lease_owner="someone-else") is False
    assert store.delete("alice", K, expected_version=row.version + 1, lease_owner="disconnect") is False
    assert store.delete("alice", K, expected_version=row.version, lease_owner="disconnect") is True
    assert store.get("alice", K) is None
