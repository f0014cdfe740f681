"""A policy hook for the HTTP API tests, loaded through CREDBROKER_POLICY."""

from __future__ import annotations

from broker.policy import PolicyDecision, PolicyInput


def deny_blocked_users(data: PolicyInput) -> PolicyDecision:
    """Deny every user whose id starts with ``blocked-``; allow everyone else."""
    if data.user_id.startswith("blocked-"):
        return PolicyDecision(False, "user_blocked")
    return PolicyDecision(True)
