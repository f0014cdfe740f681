"""Audit events: secret-free by construction, persisted, queried newest first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.audit import Action, AuditEvent, Outcome, SqlAuditLog
from tests.secrets import canary

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(i: int, user: str = "alice", server: str = "github", **kw: object) -> AuditEvent:
    return AuditEvent(action=Action.ACQUIRE, outcome=Outcome.SUCCESS, user_id=user, server=server,
                      method="token_exchange", ts=T0 + timedelta(seconds=i), **kw)  # type: ignore[arg-type]


def test_no_field_can_hold_a_token() -> None:
    token = canary("audit")
    e = AuditEvent(action="refresh", outcome="failure", user_id="alice", server="s",
                   method=token, reason=token, request_id=token + " spaces")  # type: ignore[arg-type]
    assert token not in repr(e.to_dict())
    assert e.reason == "other" and e.method == "none" and e.request_id is None
    with pytest.raises(ValueError):
        AuditEvent(action="shout", outcome="success")  # type: ignore[arg-type]


def test_persist_and_query(engine) -> None:  # type: ignore[no-untyped-def]
    log = SqlAuditLog(engine)
    log.record([ev(i) for i in range(5)] + [ev(10, user="alice:x"), ev(11, server="jira"),
                                            ev(12, reason="invalid_grant", request_id="req-1")])
    newest = log.query(user_id="alice", limit=3)
    assert [r["ts"] for r in newest] == [(T0 + timedelta(seconds=s)).isoformat() for s in (12, 11, 4)]
    assert newest[0]["reason"] == "invalid_grant" and newest[0]["request_id"] == "req-1"
    assert {r["user_id"] for r in log.query(user_id="alice", limit=100)} == {"alice"}
    assert len(log.query(server="jira")) == 1
    assert len(log.query(user_id="alice", server="github", since=T0 + timedelta(seconds=3), limit=100)) == 3
    first_id = log.query(limit=100)[-1]["id"]
    follow = log.query(after_id=first_id, limit=100)
    assert [r["id"] for r in follow] == sorted(r["id"] for r in follow) and len(follow) == 7
    round_trip = AuditEvent.from_dict(newest[0])
    assert round_trip.reason == "invalid_grant"
