"""Pure retry timing."""

from __future__ import annotations

import pytest

from broker.errors import UpstreamError
from broker.oauth.backoff import compute_backoff, retry_delay


def test_exponential_without_jitter_is_capped() -> None:
    delays = [compute_backoff(n, jitter=False) for n in range(1, 9)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


def test_full_jitter_scales_by_rand() -> None:
    assert compute_backoff(3, rand=lambda: 0.5) == pytest.approx(0.4)
    assert compute_backoff(3, rand=lambda: 0.0) == 0.0
    assert 0 <= compute_backoff(3) < 0.8


def test_custom_parameters_and_absurd_attempts() -> None:
    assert compute_backoff(2, base=1, factor=3, cap=100, jitter=False) == 3
    assert compute_backoff(10**9, jitter=False) == 5.0
    assert compute_backoff(0, jitter=False) == pytest.approx(0.2)


def test_non_retryable_error_gives_up() -> None:
    assert retry_delay(UpstreamError(status=400), 1, 10.0) is None


def test_retryable_error_uses_backoff() -> None:
    err = UpstreamError(status=503, retryable=True)
    assert retry_delay(err, 2, 10.0, rand=lambda: 0.5) == pytest.approx(0.2)


def test_retry_after_wins_over_backoff() -> None:
    err = UpstreamError(status=429, retryable=True, retry_after=3.0)
    assert retry_delay(err, 1, 10.0, rand=lambda: 0.0) == 3.0


def test_budget_that_cannot_cover_the_wait_gives_up() -> None:
    assert retry_delay(UpstreamError(status=429, retryable=True, retry_after=30.0), 1, 10.0) is None
    assert retry_delay(UpstreamError(status=503, retryable=True), 6, 1.0, rand=lambda: 0.9) is None
    assert retry_delay(UpstreamError(status=503, retryable=True), 1, 0.0) is None
    assert retry_delay(UpstreamError(status=503, retryable=True), 1, -2.0) is None
