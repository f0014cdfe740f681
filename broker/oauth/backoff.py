"""Pure retry timing for authorization-server calls (exponential, full jitter)."""

from __future__ import annotations

import random
from collections.abc import Callable

from ..errors import UpstreamError

__all__ = ["compute_backoff", "retry_delay", "next_attempt_delay"]

# Keeps factor ** exponent finite for absurd attempt numbers.
_MAX_EXPONENT = 32


def compute_backoff(
    attempt: int,
    *,
    base: float = 0.2,
    factor: float = 2,
    cap: float = 5.0,
    jitter: bool = True,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1 = the first).

    Full jitter (uniform in [0, delay)) spreads a herd of workers that failed
    together, which matters when a whole cluster hits the same outage.
    """
    exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
    delay = min(cap, base * factor**exponent)
    return delay * rand() if jitter else delay


def retry_delay(
    error: UpstreamError,
    attempt: int,
    remaining_budget: float,
    *,
    rand: Callable[[], float] = random.random,
    base: float = 0.2,
    cap: float = 5.0,
) -> float | None:
    """How long to wait before retrying after ``error``, or None to give up.

    A server's ``Retry-After`` wins over the computed backoff; when it asks
    for longer than the budget left we give up now instead of calling early,
    and the caller sees ``error.retry_after`` to schedule its own retry.
    """
    if not error.retryable or remaining_budget <= 0:
        return None
    if error.retry_after is not None:
        delay = max(error.retry_after, 0.0)
    else:
        delay = compute_backoff(attempt, base=base, cap=cap, rand=rand)
    if delay >= remaining_budget:
        return None
    return delay


def next_attempt_delay(
    failures: int,
    *,
    retry_after: float | None = None,
    base: float = 10.0,
    cap: float = 3600.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before a credential's next renewal after ``failures`` consecutive
    transient failures (1 = the first).

    Exponential with "equal" jitter (uniform in [d/2, d]): spread enough that
    credentials which failed together do not return together, with a floor so
    one unlucky draw cannot turn backoff into a retry storm. A server's
    ``Retry-After`` is a lower bound; ``cap`` bounds everything, so a server
    asking for a month is asked again within the cap.
    """
    exponent = min(max(failures, 1) - 1, _MAX_EXPONENT)
    delay = min(cap, base * 2.0**exponent)
    delay = delay / 2 + delay / 2 * rand()
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return max(0.0, min(cap, delay))
