"""Issue 12's pure parts: key roles, state caps, masking, retention, the new settings."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta

import pytest

from broker.audit import Action, AuditEvent, Outcome, SqlAuditLog, prune_expired
from broker.connect import mask_user
from broker.crypto import DecryptError, Keyring
from broker.errors import ConfigError
from broker.settings import load_settings
from broker.state import MemoryStateStore
from tests.conftest import key_line


def settings(**env: str):  # type: ignore[no-untyped-def]
    return load_settings({f"CREDBROKER_{k}": v for k, v in env.items()}, env_file=None)


OLD, NEW = os.urandom(32), os.urandom(32)


def test_the_internal_key_is_not_the_transport_key() -> None:
    s = settings(MASTER_KEYS=key_line("k1", OLD), TRANSPORT_KEY=base64.b64encode(os.urandom(32)).decode())
    transport, internal = s.sealer(), s.internal_sealer()
    assert transport is not None and internal is not None
    blob = transport.seal_json({"u": "victim"}, "credbroker:connect:x")
    with pytest.raises(DecryptError):  # what a gateway can seal, the connect flow does not open
        internal.open_json(blob, "credbroker:connect:x")
    derived = settings(MASTER_KEYS=key_line("k1", OLD))
    assert derived.sealer() is not None and derived.internal_sealer() is not None
    with pytest.raises(DecryptError):  # also when the transport key is derived from the master key
        derived.internal_sealer().open(derived.sealer().seal(b"x", "p"), "p")  # type: ignore[union-attr]
    assert settings().internal_sealer() is None  # no master key: no connect flow


def test_sealed_blobs_survive_a_master_key_rotation() -> None:
    before = settings(MASTER_KEYS=key_line("old", OLD))
    after = settings(MASTER_KEYS=f"{key_line('new', NEW)},{key_line('old', OLD)}")
    for role in ("sealer", "internal_sealer"):
        sealed_before = getattr(before, role)().seal(b"state", "p")
        assert getattr(after, role)().open(sealed_before, "p") == b"state"  # an open link keeps working
        sealed_after = getattr(after, role)().seal(b"state", "p")
        assert getattr(after, role)().open(sealed_after, "p") == b"state"
    ring = Keyring((("new", NEW), ("old", OLD)))
    assert ring.derive_ring("l").keys[1] == Keyring((("old", OLD),)).derive_ring("l").keys[0]  # stable per key


def test_live_states_are_capped_per_group_oldest_first() -> None:
    states = MemoryStateStore()
    for i in range(50):
        states.put(f"s{i}", {"i": i}, 600, group="pair", cap=5)
        states.bind(f"s{i}", "digest", 600)
    assert [s for s in (f"s{i}" for i in range(50)) if states.peek(s) is not None] == [f"s{i}" for i in range(45, 50)]
    assert states.binding("s0") is None and states.binding("s49") == "digest"
    states.put("other", {}, 600, group="another-pair", cap=5)
    assert states.discard_group("pair") == 5 and states.peek("s49") is None and states.peek("other") is not None


@pytest.mark.parametrize(("user", "masked"), [
    ("alice", "a***e"), ("alice@example.com", "a***e@example.com"), ("al", "**"), ("a", "*"),
    ("auth0|5f7c0123456789", "a******9"), ("tenant:alice", "t******e"),
])
def test_mask_user_shows_enough_to_recognise_oneself(user: str, masked: str) -> None:
    assert mask_user(user) == masked


def test_new_settings_parse_and_validate() -> None:
    s = settings(CONNECT_CALLBACK_URL="https://gw.example/connect/done", CONNECT_STATES_PER_PAIR="3",
                 AUDIT_RETENTION_DAYS="30", PUBLIC_URL="https://broker.example")
    assert s.callback_url == "https://gw.example/connect/done" and s.open_url is None
    assert s.connect_states_per_pair == 3 and s.audit_retention_days == 30
    default = settings(PUBLIC_URL="https://broker.example")
    assert default.callback_url == "https://broker.example/v1/connect/callback"
    assert default.open_url == "https://broker.example/v1/connect/open" and default.audit_retention_days == 0
    for bad in ({"CONNECT_CALLBACK_URL": "ftp://x"}, {"AUDIT_RETENTION_DAYS": "0"},
                {"CONNECT_STATES_PER_PAIR": "-1"}):
        with pytest.raises(ConfigError):
            settings(**bad)


def test_retention_prunes_in_batches_and_keeps_recent_events(engine) -> None:  # type: ignore[no-untyped-def]
    sql = SqlAuditLog(engine)
    now = datetime(2026, 6, 1, tzinfo=UTC)
    sql.record([AuditEvent(Action.INJECT, Outcome.SUCCESS, user_id=f"u{i}", ts=now - timedelta(days=40, seconds=i))
                for i in range(23)])
    sql.record([AuditEvent(Action.INJECT, Outcome.SUCCESS, user_id="recent", ts=now - timedelta(days=29))])

    assert prune_expired(sql, now, 0) == 0  # 0 keeps everything
    assert prune_expired(sql, now, 30, batch_size=5, max_batches=2) == 10  # bounded per run
    assert prune_expired(sql, now, 30, batch_size=5) == 13
    rows = sql.query(limit=100)
    assert [r["user_id"] for r in rows] == ["recent"]


def test_the_beat_schedules_audit_retention() -> None:
    from workers.celery_app import TASK_PRUNE_AUDIT, make_celery

    app = make_celery(settings())
    assert any(e["task"] == TASK_PRUNE_AUDIT for e in app.conf.beat_schedule.values())
    assert "workers.retention" in make_celery(settings(), main=True).conf.imports


def test_the_prune_task_applies_the_setting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from broker.db import make_engine
    from broker.migrate import upgrade
    from broker.settings import Settings
    from workers.retention import prune_audit
    from workers.runtime import runtime, set_settings

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = make_engine(url)
    upgrade(engine)
    sql = SqlAuditLog(engine)
    now = datetime.now(UTC)
    sql.record([AuditEvent(Action.INJECT, Outcome.SUCCESS, user_id="old", ts=now - timedelta(days=31)),
                AuditEvent(Action.INJECT, Outcome.SUCCESS, user_id="new", ts=now - timedelta(days=1))])
    try:
        set_settings(Settings(database_url=url))  # unset: keep everything
        assert prune_audit() == {"deleted": 0, "retention_days": 0}
        runtime().close()
        set_settings(Settings(database_url=url, audit_retention_days=30))
        assert prune_audit() == {"deleted": 1, "retention_days": 30}
        runtime().close()
    finally:
        set_settings(None)
        engine.dispose()
    assert [r["user_id"] for r in sql.query()] == ["new"]
