"""Failure classes and the per-credential next-attempt delay (pure)."""

from __future__ import annotations

import pytest

from broker.errors import BrokerError, NotConnected, SubjectTokenMissing, UpstreamError
from broker.oauth.backoff import next_attempt_delay
from broker.oauth.failures import FailureClass, classify

P, T = FailureClass.PERMANENT, FailureClass.TRANSIENT


@pytest.mark.parametrize(("exc", "expected"), [
    (UpstreamError(status=400, oauth_error="invalid_grant"), P),
    (UpstreamError(status=401, oauth_error="invalid_client"), P),
    (UpstreamError(status=400, oauth_error="unauthorized_client"), P),
    (UpstreamError(status=400, oauth_error="invalid_scope"), P),
    (UpstreamError(status=400, oauth_error="unsupported_grant_type"), P),
    (UpstreamError(status=403), P),
    (UpstreamError(status=404), P),
    (UpstreamError(status=400, oauth_error="invalid_request"), P),
    # GitHub-style: an error code inside a 200 answer
    (UpstreamError(status=200, oauth_error="invalid_grant"), P),
    (SubjectTokenMissing(), P),
    (UpstreamError("timed out", retryable=True), T),
    (UpstreamError("could not reach", retryable=True), T),
    (UpstreamError(status=500), T),
    (UpstreamError(status=503, oauth_error="temporarily_unavailable", retryable=True), T),
    (UpstreamError(status=400, oauth_error="temporarily_unavailable"), T),
    (UpstreamError(status=429, retry_after=30), T),
    (UpstreamError(status=408), T),
    (UpstreamError(status=200), T),  # a malformed 2xx body: not worth a reconnect
    (BrokerError(), T),
])
def test_classify(exc: BrokerError, expected: FailureClass) -> None:
    assert classify(exc) is expected


def test_not_connected_is_not_a_provider_answer() -> None:
    assert classify(NotConnected(reason="reconnect_required")) is T


def test_delay_doubles_with_equal_jitter_and_is_capped() -> None:
    low = [next_attempt_delay(n, base=10, cap=3600, rand=lambda: 0.0) for n in range(1, 12)]
    high = [next_attempt_delay(n, base=10, cap=3600, rand=lambda: 1.0) for n in range(1, 12)]
    assert high[:5] == pytest.approx([10, 20, 40, 80, 160])
    assert low[:5] == pytest.approx([5, 10, 20, 40, 80])
    assert high[-1] == 3600 and low[-1] == 1800
    assert next_attempt_delay(10**9, base=10, cap=3600, rand=lambda: 1.0) == 3600
    for n in range(1, 20):
        d = next_attempt_delay(n, base=10, cap=3600)
        assert min(3600, 10 * 2 ** (n - 1)) / 2 <= d <= min(3600, 10 * 2 ** (n - 1))


def test_retry_after_is_a_floor_within_the_cap() -> None:
    assert next_attempt_delay(1, retry_after=2, base=1, rand=lambda: 0.0) == 2
    assert next_attempt_delay(1, retry_after=0.1, base=10, rand=lambda: 0.0) == 5
    assert next_attempt_delay(1, retry_after=86400 * 30, base=10, cap=3600) == 3600
    assert next_attempt_delay(0, base=10, rand=lambda: 1.0) == 10
