"""Flight outcomes as Celery states: failures raise a secret-free FlightFailed,
answers stay SUCCESS, and callers read both the same way."""

from __future__ import annotations

import json

import pytest

from broker.errors import NotConnected, PolicyDenied, ServiceUnavailable, SubjectTokenMissing, UpstreamError
from workers.outcomes import FlightFailed, flight_result, raise_if_failed, summary


def test_failures_raise_with_a_summary_answers_pass() -> None:
    up = {"error": UpstreamError(status=502, oauth_error="invalid_grant").to_dict(), "trigger": "resolve"}
    with pytest.raises(FlightFailed) as info:
        raise_if_failed(up)
    assert str(info.value) == repr(info.value) == "UpstreamError: 502 invalid_grant"
    assert summary(ServiceUnavailable("database unavailable").to_dict()) == "ServiceUnavailable: unavailable"
    for exc in (NotConnected(reason="never_connected"), SubjectTokenMissing(), PolicyDenied("no")):
        result = {"error": exc.to_dict(), "trigger": "resolve"}
        assert raise_if_failed(result) is result
    assert raise_if_failed({"ok": "sealed"}) == {"ok": "sealed"}


def test_callers_read_failure_and_success_metas_alike() -> None:
    from celery import Celery

    up = {"error": UpstreamError(status=503).to_dict(), "trigger": "resolve"}
    backend = Celery(set_as_current=False).backend  # the disabled backend still serializes exceptions
    try:
        raise_if_failed(up)
    except FlightFailed as exc:
        stored = json.loads(json.dumps(backend.prepare_exception(exc, "json")))
    meta = {"status": "FAILURE", "result": stored}
    assert flight_result(meta) == up
    assert flight_result({"status": "SUCCESS", "result": {"ok": "x"}}) == {"ok": "x"}
    assert flight_result({"status": "FAILURE", "result": {"exc_type": "KeyError", "exc_message": ["k"]}}) is None
    assert flight_result(None) is None
