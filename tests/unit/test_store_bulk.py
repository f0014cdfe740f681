"""The bulk store a warm batch uses (``broker.store_bulk``), on SQLite and
PostgreSQL: first mints with their events in one insert, an existing row left
alone, reads of many users of one server, more users than one chunk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select

from broker import store_bulk
from broker.clock import FakeClock
from broker.db import credentials as T
from broker.db import subject_tokens as S
from broker.events import CONNECTED, EventLog
from broker.models import Credential, CredentialStatus, ObtainedVia, SubjectToken
from broker.secret import Secret
from broker.store import KIND_SUBJECT, CredentialStore
from broker.store_bulk import get_many, insert_first_mints, subject_tokens
from tests.conftest import make_keyring
from tests.secrets import canary

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
USED = NOW - timedelta(seconds=5)


def cred(label: str = "at") -> Credential:
    return Credential(access_token=Secret(canary(label)), refresh_token=None, obtained_via=ObtainedVia.TOKEN_EXCHANGE,
                      token_type="Bearer", issued_at=NOW, expires_at=NOW + timedelta(hours=1), scopes=("read",),
                      audience="tx-api")


@pytest.fixture
def store(engine) -> CredentialStore:  # type: ignore[no-untyped-def]
    return CredentialStore(engine, make_keyring("A"), clock=FakeClock(NOW))


def events(store: CredentialStore) -> list[tuple[str, str, str, str]]:
    return [(e.type, e.user_id, e.server, e.status) for e in EventLog(store.engine).after(0, 100_000)]


def seed_subject_tokens(store: CredentialStore, users: list[str]) -> None:
    """Many users' subject tokens in one statement (``put_subject_token`` is a
    transaction each), sealed as the store seals them."""
    rows = []
    for user in users:
        blob, kid = store._seal({"t": canary("st")}, KIND_SUBJECT, user, "")
        rows.append({"user_id": user, "version": 1, "ciphertext": blob, "key_id": kid,
                     "expires_at": NOW + timedelta(hours=1), "updated_at": NOW})
    with store.engine.begin() as conn:
        conn.execute(insert(S), rows)


def test_first_mints_are_rows_and_events(store: CredentialStore) -> None:
    minted = {u: cred(u) for u in ("alice", "bob", "名前")}
    written = insert_first_mints(store, "k1", list(minted.items()), used_at=USED)
    assert written == set(minted)
    for user, c in minted.items():
        got = store.get(user, "k1")
        assert got is not None
        assert got.credential == c
        assert got.credential.access_token.reveal() == c.access_token.reveal()
        assert got.status is CredentialStatus.CONNECTED and got.version == 1
        assert got.updated_at == NOW and got.last_used_at == USED
        assert got.refresh_at == NOW + timedelta(seconds=2880)  # the single-row write's refresh point
        assert got.lease_owner is None and got.failure is None
    assert sorted(events(store)) == sorted((CONNECTED, u, "k1", "connected") for u in minted)
    # The next write of a bulk-minted row is an ordinary versioned one, with no second "connected".
    again = store.compare_and_swap("alice", "k1", 1, cred("alice-2"))
    assert again is not None and again.version == 2
    assert len(events(store)) == 3
    assert insert_first_mints(store, "k1", []) == set()


def test_a_bulk_row_is_the_row_a_single_first_mint_writes(engine) -> None:  # type: ignore[no-untyped-def]
    """Column for column (NULLs and timestamps included), and the same event."""
    store = CredentialStore(engine, make_keyring("A"), clock=FakeClock(NOW),
                            idle_seconds=lambda key: 86400.0 if key == "idle" else None)
    forever = Credential(access_token=Secret(canary("at")), obtained_via=ObtainedVia.ENTRA_OBO)
    rotating = Credential(access_token=Secret(canary("at")), refresh_token=Secret(canary("rt")),
                          obtained_via=ObtainedVia.CONNECT_FLOW, token_type="DPoP", issued_at=NOW - timedelta(
                              minutes=3), expires_at=NOW + timedelta(minutes=7), scopes=("a", "b c"))
    for server, c in (("k1", cred()), ("k1", forever), ("idle", rotating)):
        single = f"single-{c.obtained_via.value}"
        bulk = f"bulk-{c.obtained_via.value}"
        assert store.compare_and_swap(single, server, None, c, last_used_at=USED) is not None
        assert insert_first_mints(store, server, [(bulk, c)], used_at=USED) == {bulk}
        with engine.connect() as conn:
            rows = {r.user_id: r._asdict() for r in conn.execute(select(T).where(T.c.user_id.in_([single, bulk])))}
        for row in rows.values():
            del row["user_id"], row["ciphertext"]  # sealed to its user: differs by design
        assert rows[bulk] == rows[single]
        got = store.get(bulk, server)
        assert got is not None and got.credential == c and got.keepalive_at == rows[single]["keepalive_at"]
    assert rows[bulk]["keepalive_at"] is not None  # the idle server's row has a keep-alive point
    evs = [e for e in EventLog(engine).after(0, 100)]
    assert [(e.type, e.server, e.status, e.reason, e.at) for e in evs if e.user_id.startswith("single-")] == \
        [(e.type, e.server, e.status, e.reason, e.at) for e in evs if e.user_id.startswith("bulk-")]
    assert len(evs) == 6


def test_an_existing_row_is_left_alone_and_not_reported(store: CredentialStore) -> None:
    store.put("alice", "k1", cred("first"))
    second = cred("second")
    assert store.compare_and_swap("alice", "k1", 1, second) is not None  # version 2
    before = events(store)
    assert before == [(CONNECTED, "alice", "k1", "connected")]
    written = insert_first_mints(store, "k1", [("alice", cred("late")), ("bob", cred("bob"))], used_at=USED)
    assert written == {"bob"}
    kept = store.get("alice", "k1")
    assert kept is not None and kept.version == 2 and kept.last_used_at is None
    assert kept.credential.access_token.reveal() == second.access_token.reveal()
    assert events(store) == before + [(CONNECTED, "bob", "k1", "connected")]
    # Every user present: nothing written, no event.
    assert insert_first_mints(store, "k1", [("alice", cred()), ("bob", cred())]) == set()
    assert len(events(store)) == 2
    # The same user on another server is another row.
    assert insert_first_mints(store, "k2", [("alice", cred())]) == {"alice"}
    assert store.get("alice", "k2") is not None and len(events(store)) == 3


def test_reads_are_the_asked_users_of_one_server(store: CredentialStore) -> None:
    for user in ("alice", "bob", "carol"):
        store.put(user, "k1", cred(user))
        store.put_subject_token(user, SubjectToken(Secret(canary(user + "-st")), NOW + timedelta(hours=1)))
    store.put("dave", "k2", cred("dave"))
    got = get_many(store, "k1", ["alice", "carol", "dave", "nobody"])
    assert set(got) == {"alice", "carol"}  # dave is on k2, bob was not asked
    assert got["alice"].credential == store.get("alice", "k1").credential  # type: ignore[union-attr]
    assert all(s.server_key == "k1" and s.version == 1 for s in got.values())
    assert get_many(store, "k2", ["alice", "dave"]).keys() == {"dave"}
    assert get_many(store, "k1", []) == {}
    tokens = subject_tokens(store, ["bob", "carol", "dave"])
    assert set(tokens) == {"bob", "carol"}
    assert tokens["bob"].token.reveal() == store.get_subject_token("bob").token.reveal()  # type: ignore[union-attr]
    assert tokens["bob"].expires_at == NOW + timedelta(hours=1)


def test_more_users_than_one_chunk(store: CredentialStore, monkeypatch: pytest.MonkeyPatch) -> None:
    users = [f"u{i:04d}" for i in range(store_bulk._CHUNK * 2 + 37)]
    one = cred()  # sealed per row: one credential object for all is fine
    half = users[::2]
    assert insert_first_mints(store, "k1", [(u, one) for u in half]) == set(half)
    written = insert_first_mints(store, "k1", [(u, one) for u in users], used_at=USED)
    assert written == set(users) - set(half)
    assert len(events(store)) == len(users)
    got = get_many(store, "k1", users)
    assert set(got) == set(users)
    assert sum(s.last_used_at == USED for s in got.values()) == len(users) - len(half)
    seed_subject_tokens(store, users[:store_bulk._CHUNK + 3])
    signed_in = set(users[:store_bulk._CHUNK + 3])
    assert set(subject_tokens(store, users)) == signed_in
    # The reads go in chunks: a smaller chunk gives the same answer.
    monkeypatch.setattr(store_bulk, "_CHUNK", 7)
    assert set(get_many(store, "k1", users)) == set(users)
    assert set(subject_tokens(store, users)) == signed_in
