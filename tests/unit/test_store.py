"""The encrypted credential store on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from broker.clock import FakeClock
from broker.crypto import Keyring
from broker.db import credentials as T
from broker.db import subject_tokens as S
from broker.errors import ServiceUnavailable, StoreDisabled
from broker.models import Credential, CredentialStatus, ObtainedVia, SubjectToken
from broker.secret import Secret
from broker.store import CredentialStore
from tests.conftest import make_keyring
from tests.secrets import canary

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
USERS = ["alice", "alice:x", "auth0|5f7c", "bob@example.com", "tenant:alice", "zoë-ßtraße", "名前", "'; DROP TABLE credentials; --"]


def cred(label: str = "at", *, refresh: bool = True, ttl: int = 3600, via: ObtainedVia = ObtainedVia.TOKEN_EXCHANGE) -> Credential:
    return Credential(
        access_token=Secret(canary(label)),
        refresh_token=Secret(canary(label + "-rt")) if refresh else None,
        obtained_via=via,
        token_type="Bearer",
        issued_at=NOW,
        expires_at=NOW + timedelta(seconds=ttl),
        scopes=("read", "write"),
        audience="https://api.example.com",
    )


@pytest.fixture
def store(engine) -> CredentialStore:  # type: ignore[no-untyped-def]
    return CredentialStore(engine, make_keyring("A"), clock=FakeClock(NOW))


def test_round_trip_every_field(store: CredentialStore) -> None:
    c = cred()
    written = store.put("alice", "k1", c)
    got = store.get("alice", "k1")
    assert got is not None
    assert got.credential == c
    assert got.credential.access_token.reveal() == c.access_token.reveal()
    assert got.credential.refresh_token is not None and c.refresh_token is not None
    assert got.credential.refresh_token.reveal() == c.refresh_token.reveal()
    assert got.status is CredentialStatus.CONNECTED
    assert got.version == written.version == 1
    assert got.updated_at == NOW
    # refresh point: 80% of a one-hour lifetime comes before expiry minus 60 s
    assert got.refresh_at == NOW + timedelta(seconds=2880)
    assert store.get("alice", "missing") is None


def test_no_refresh_token_no_expiry(store: CredentialStore) -> None:
    c = Credential(access_token=Secret(canary()), obtained_via=ObtainedVia.ENTRA_OBO)
    store.put("u", "k", c)
    got = store.get("u", "k")
    assert got is not None and got.credential == c and got.refresh_at is None


def test_same_credential_twice_gives_different_ciphertext(store: CredentialStore) -> None:
    c = cred()
    store.put("alice", "k1", c)
    store.put("bob", "k1", c)
    with store.engine.connect() as conn:
        blobs = [bytes(r.ciphertext) for r in conn.execute(select(T.c.ciphertext))]
    assert len(set(blobs)) == 2
    assert all(c.access_token.reveal().encode() not in b for b in blobs)


def test_per_user_isolation_with_odd_user_ids(store: CredentialStore) -> None:
    written = {}
    for user in USERS:
        for server in ("k1", "k2"):
            written[(user, server)] = cred("iso")
            store.put(user, server, written[(user, server)])
    for user in USERS:
        listing = store.list(user)
        assert {s.user_id for s in listing} == {user}
        assert sorted(s.server_key for s in listing) == ["k1", "k2"]
        for s in listing:
            assert s.credential.access_token == written[(user, s.server_key)].access_token
        for server in ("k1", "k2"):
            got = store.get(user, server)
            assert got is not None and got.credential.access_token == written[(user, server)].access_token
    assert store.list("alice:") == [] and store.list("ALICE") == [] and store.list("%") == []
    with store.engine.connect() as conn:  # the injection-looking id did no harm
        assert conn.execute(text("SELECT count(*) FROM credentials")).scalar() == len(USERS) * 2


def test_subject_tokens_are_a_separate_kind(store: CredentialStore) -> None:
    token = SubjectToken(Secret(canary("subject")), NOW + timedelta(hours=1))
    store.put_subject_token("alice", token)
    store.put("alice", "k1", cred())
    assert [s.server_key for s in store.list("alice")] == ["k1"]
    assert store.get_subject_token("alice") == token
    assert store.get_subject_token("alice:x") is None
    newer = SubjectToken(Secret(canary("subject2")))
    store.put_subject_token("alice", newer)
    assert store.get_subject_token("alice") == newer
    assert store.delete_subject_token("alice") and store.get_subject_token("alice") is None


def test_ciphertext_copied_to_another_row_reads_as_absent(store: CredentialStore, caplog: pytest.LogCaptureFixture) -> None:
    store.put("alice", "k1", cred())
    store.put("bob", "k1", cred())
    store.put("alice", "k2", cred())
    with store.engine.begin() as conn:
        blob = conn.execute(select(T.c.ciphertext).where(T.c.user_id == "alice", T.c.server_key == "k1")).scalar_one()
        conn.execute(update(T).where(T.c.user_id == "bob").values(ciphertext=blob))
        conn.execute(update(T).where(T.c.user_id == "alice", T.c.server_key == "k2").values(ciphertext=blob))
    assert store.get("bob", "k1") is None
    assert store.get("alice", "k2") is None
    assert [s.server_key for s in store.list("alice")] == ["k1"]
    assert store.decrypt_failures == 3
    assert "unreadable credential record" in caplog.text


def test_subject_token_copied_into_credential_row_reads_as_absent(store: CredentialStore) -> None:
    store.put_subject_token("alice", SubjectToken(Secret(canary())))
    store.put("alice", "", cred())
    with store.engine.begin() as conn:
        blob = conn.execute(select(S.c.ciphertext)).scalar_one()
        conn.execute(update(T).values(ciphertext=blob))
    assert store.get("alice", "") is None


def test_flipped_byte_reads_as_absent(store: CredentialStore) -> None:
    store.put("alice", "k1", cred())
    with store.engine.begin() as conn:
        blob = bytearray(conn.execute(select(T.c.ciphertext)).scalar_one())
        blob[-5] ^= 0x80
        conn.execute(update(T).values(ciphertext=bytes(blob)))
    assert store.get("alice", "k1") is None
    assert store.list("alice") == []


def test_key_rotation_old_records_still_read(engine) -> None:  # type: ignore[no-untyped-def]
    a = make_keyring("A")
    b = make_keyring("B")
    c = cred()
    CredentialStore(engine, a, clock=FakeClock(NOW)).put("alice", "k1", c)
    both = CredentialStore(engine, Keyring(b.keys + a.keys), clock=FakeClock(NOW))
    got = both.get("alice", "k1")
    assert got is not None and got.credential == c
    both.put("bob", "k1", c)
    with engine.connect() as conn:
        kids = dict(conn.execute(select(T.c.user_id, T.c.key_id)).all())
    assert kids == {"alice": "A", "bob": "B"}
    # with A removed, the record under A reads as absent, never as something else
    assert CredentialStore(engine, b).get("alice", "k1") is None


def test_reencrypt_moves_everything_and_is_resumable(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = make_keyring("A"), make_keyring("B")
    old = CredentialStore(engine, a, clock=FakeClock(NOW))
    originals = {}
    for i in range(25):
        originals[f"u{i}"] = cred()
        old.put(f"u{i}", "k", originals[f"u{i}"])
        old.put_subject_token(f"u{i}", SubjectToken(Secret(canary("st"))))
    rotated = CredentialStore(engine, Keyring(b.keys + a.keys), clock=FakeClock(NOW))
    assert rotated.count_stale_keys() == 50
    # interrupt after the first batch
    gen = rotated._reencrypt_table(T, "credential", 10, report := __import__("broker.store").store.RotationReport())
    next(gen)
    gen.close()
    assert report.rewritten == 10 and rotated.count_stale_keys() == 40
    report2 = rotated.reencrypt(batch_size=7)
    assert report2.rewritten == 40 and rotated.count_stale_keys() == 0
    only_b = CredentialStore(engine, b)
    for user, c in originals.items():
        got = only_b.get(user, "k")
        assert got is not None and got.credential == c and got.version == 1  # fence untouched
        assert only_b.get_subject_token(user) is not None


def test_compare_and_swap_fence(store: CredentialStore) -> None:
    first = store.compare_and_swap("alice", "k1", None, cred("v1"))
    assert first is not None and first.version == 1
    assert store.compare_and_swap("alice", "k1", None, cred("dup")) is None  # insert-only lost
    second = store.compare_and_swap("alice", "k1", 1, cred("v2"))
    assert second is not None and second.version == 2
    stale = store.compare_and_swap("alice", "k1", 1, cred("late"))
    assert stale is None
    got = store.get("alice", "k1")
    assert got is not None and got.credential == second.credential and got.version == 2
    assert store.set_status("alice", "k1", CredentialStatus.NEEDS_RECONNECT, expected_version=1) is False
    assert store.set_status("alice", "k1", CredentialStatus.NEEDS_RECONNECT, expected_version=2, failure="invalid_grant")
    got = store.get("alice", "k1")
    assert got is not None and got.status is CredentialStatus.NEEDS_RECONNECT and got.failure == "invalid_grant"


def test_delete_and_touch(store: CredentialStore) -> None:
    store.put("alice", "k1", cred())
    store.put("alice:x", "k1", cred())
    store.touch("alice", "k1", NOW + timedelta(minutes=5))
    got = store.get("alice", "k1")
    assert got is not None and got.last_used_at == NOW + timedelta(minutes=5)
    assert store.delete("alice", "k1") is True
    assert store.delete("alice", "k1") is False
    assert store.get("alice", "k1") is None
    assert store.get("alice:x", "k1") is not None


def test_due_selects_refresh_window_of_recent_users(store: CredentialStore) -> None:
    store.put("hot", "k", cred(ttl=100))       # refresh point NOW+40s (expiry-60 < 80%)
    store.put("cold", "k", cred(ttl=100))
    store.put("later", "k", cred(ttl=3600))
    store.put("gone", "k", cred(ttl=100))
    for user in ("hot", "later", "gone"):
        store.touch(user, "k", NOW)
    store.set_status("gone", "k", CredentialStatus.NEEDS_RECONNECT)
    at = NOW + timedelta(seconds=45)
    assert store.due(at, used_since=NOW - timedelta(hours=1)) == [("hot", "k")]
    # a refresh point older than the recent-use window is outside the scanned range,
    # even for a credential used within it
    store.touch("hot", "k", NOW + timedelta(seconds=44))
    assert store.due(at, used_since=NOW + timedelta(seconds=39)) == [("hot", "k")]
    assert store.due(at, used_since=NOW + timedelta(seconds=41)) == []
    assert store.due(NOW + timedelta(seconds=30), used_since=NOW - timedelta(hours=1)) == []


def test_disabled_store_raises_on_every_operation(engine) -> None:  # type: ignore[no-untyped-def]
    store = CredentialStore(engine, None)
    assert not store.enabled
    calls = [
        lambda: store.get("a", "k"),
        lambda: store.put("a", "k", cred()),
        lambda: store.compare_and_swap("a", "k", None, cred()),
        lambda: store.set_status("a", "k", CredentialStatus.EXPIRED),
        lambda: store.touch("a", "k"),
        lambda: store.delete("a", "k"),
        lambda: store.list("a"),
        lambda: store.due(NOW, NOW),
        lambda: store.put_subject_token("a", SubjectToken(Secret("x"))),
        lambda: store.get_subject_token("a"),
        lambda: store.delete_subject_token("a"),
        lambda: store.count_stale_keys(),
        lambda: store.reencrypt(),
    ]
    for call in calls:
        with pytest.raises(StoreDisabled, match="CREDBROKER_MASTER_KEYS"):
            call()


def test_database_down_is_a_clear_503(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from broker.db import make_engine

    eng = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", pool_pre_ping=False)
    store = CredentialStore(eng, make_keyring("A"))
    with pytest.raises(ServiceUnavailable, match="database unavailable") as info:
        store.get("alice", "k1")
    assert "127.0.0.1" not in str(info.value)
