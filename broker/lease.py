"""The lease fence: one flight at a time may present a row's refresh token.

A rotating refresh token is good for one presentation. Redis claims only tell
waiting callers which flight to join; they can vanish at any moment (failover,
restart without persistence, a deleted key), so they cannot be what keeps two
flights from presenting the same token. The credential row can: before a
flight presents the row's refresh token (or its user's subject token), it takes
the row's lease with one conditional UPDATE in the database's clock
(``CredentialStore.take_lease``), sized to the worst-case provider call. Only
the holder calls the provider; its write is conditional on still holding the
lease and on the version it read, and releases the lease in the same statement.

A lease found expired but never released means the previous flight's outcome
is unknown (killed, paused or cut off mid-call): the token may already be spent.
The next flight presents it once; on ``invalid_grant`` the credential is marked
``needs_reconnect`` with the reason ``rotation_lost``, counted and audited, never
silently.

First mint with no row yet takes no lease: subject-token exchange does not
rotate anything, so two concurrent first mints only cost one spare call, and the
insert is itself a compare-and-swap (only one row can be created; the loser
serves the winner's record).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from .models import StoredCredential
from .settings import Settings

__all__ = ["LeaseTake", "ROTATION_LOST", "lease_seconds", "local_owner"]

# The store's failure reason and the audit reason when an expired lease's
# outcome turned out to be a spent refresh token.
ROTATION_LOST = "rotation_lost"


@dataclass(frozen=True)
class LeaseTake:
    """What one attempt to take a row's lease found.

    ``current`` is the row as observed when taken, else as re-read (None: the row
    is gone). ``took_over``: the previous owner's lease had expired unreleased.
    """

    taken: bool
    current: StoredCredential | None
    took_over: bool = False


def lease_seconds(settings: Settings) -> float:
    """Worst-case provider call plus margin: every attempt's connect and read
    timeouts, the retry budget slept between them, and the margin."""
    per_attempt = settings.http_connect_timeout + settings.http_read_timeout
    return per_attempt * max(1, settings.provider_max_attempts) + settings.provider_retry_seconds \
        + settings.lease_margin_seconds


def local_owner() -> str:
    """An owner id for a renewal not run by a flight task (tests, tools)."""
    return "local-" + uuid.uuid4().hex
