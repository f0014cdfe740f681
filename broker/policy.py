"""The policy hook: evaluated on every resolve, after acquisition.

A hook is any callable taking a PolicyInput and returning a PolicyDecision,
an ``(allow, reason)`` pair or a plain bool. The default allows everything;
an exception inside a hook denies, and says so.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import ConfigError, PolicyDenied

__all__ = ["PolicyInput", "PolicyDecision", "Policy", "allow_all", "load_policy", "evaluate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyInput:
    """What a hook may see: identities and the credential's non-secret metadata."""

    user_id: str
    server: str
    server_key: str
    scopes: tuple[str, ...]
    audience: str | None
    expires_at: datetime | None
    obtained_via: str


@dataclass(frozen=True)
class PolicyDecision:
    allow: bool
    reason: str | None = None


Policy = Callable[[PolicyInput], Any]


def allow_all(_: PolicyInput) -> PolicyDecision:
    return PolicyDecision(True)


def load_policy(path: str | None) -> Policy:
    """Import ``package.module:object``; a missing hook stops start-up clearly."""
    if not path:
        return allow_all
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"CREDBROKER_POLICY: cannot load {path!r}: {type(exc).__name__}") from None
    if not callable(obj):
        raise ConfigError(f"CREDBROKER_POLICY: {path!r} is not callable")
    return obj  # type: ignore[no-any-return]


def evaluate(policy: Policy, data: PolicyInput) -> PolicyDecision:
    """Run the hook and normalise its answer; anything odd denies."""
    try:
        answer = policy(data)
    except Exception as exc:  # noqa: BLE001 - a broken hook must deny, not crash
        log.warning("policy hook raised %s; denying", type(exc).__name__)
        return PolicyDecision(False, "policy_error")
    if isinstance(answer, PolicyDecision):
        return answer
    if isinstance(answer, bool):
        return PolicyDecision(answer, None if answer else "denied")
    if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool):
        return PolicyDecision(answer[0], None if answer[1] is None else str(answer[1]))
    log.warning("policy hook returned %s; denying", type(answer).__name__)
    return PolicyDecision(False, "policy_invalid_answer")


def enforce(policy: Policy, data: PolicyInput) -> None:
    decision = evaluate(policy, data)
    if not decision.allow:
        reason = decision.reason or "denied"
        raise PolicyDenied(f"denied by policy: {reason[:120]}")
