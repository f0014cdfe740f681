"""Pre-warming: mint or renew a user's credentials before the first call.

A warm is an ordinary flight. It takes the (user, server) claim like a
resolve; if a flight already holds it, the warm is that flight (nothing is
sent), and a resolve arriving while a warm flies joins it. The flight runs
the resolve ordering without a caller, so a fresh credential costs no
provider call (it is only re-cached for the fast path), a due one is renewed
and a missing exchange credential is minted.

What cannot be warmed is skipped with a reason, decided here from the store:
``never_connected`` (a connect-flow server the user never connected),
``needs_reconnect``, ``subject_token_missing`` (exchange servers) and
``policy_denied`` (the policy hook refuses the credential's metadata).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.errors import BrokerError, PolicyDenied
from broker.models import CredentialStatus, SubjectToken
from broker.policy import PolicyInput, enforce
from broker.servers import Mode, ServerConfig
from broker.store import StoredCredential

from workers.common.constants import flight_key
from workers.common.flight import new_task_id
from workers.common.runtime import Runtime

__all__ = ["WarmPlan", "plan_warm", "skip_reason", "send_warm", "warm_user", "EXCHANGE_MODES",
           "NEVER_CONNECTED", "NEEDS_RECONNECT", "SUBJECT_TOKEN_MISSING", "POLICY_DENIED"]

log = logging.getLogger(__name__)

NEVER_CONNECTED = "never_connected"
NEEDS_RECONNECT = "needs_reconnect"
SUBJECT_TOKEN_MISSING = "subject_token_missing"
POLICY_DENIED = "policy_denied"
EXCHANGE_MODES = (Mode.TOKEN_EXCHANGE, Mode.ENTRA_OBO)

# (task name, args, task id) -> None: sends one Celery task.
Send = Callable[[str, list[Any], str], None]


@dataclass
class WarmPlan:
    """What a warm of one user will do: servers to fly, servers skipped and why."""

    user_id: str
    fly: list[ServerConfig] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def queued(self) -> list[str]:
        return [s.name for s in self.fly]


def skip_reason(rt: Runtime, user_id: str, server: ServerConfig, stored: StoredCredential | None,
                subject: SubjectToken | None, now: datetime) -> str | None:
    """Why a warm of (user, server) can do nothing, from what the store holds
    (None: fly). ``subject`` is only looked at when an exchange must mint."""
    if server.mode is Mode.OAUTH_CONNECT:
        if stored is None:
            return NEVER_CONNECTED
        if stored.status is CredentialStatus.NEEDS_RECONNECT and stored.credential.is_expired(now):
            return NEEDS_RECONNECT
    elif stored is None or stored.credential.is_expired(now):
        if subject is None or subject.is_expired(now):
            return SUBJECT_TOKEN_MISSING
    cfg = server.auth_broker
    data = (PolicyInput(user_id, server.name, server.key, stored.credential.scopes, stored.credential.audience,
                        stored.credential.expires_at, stored.credential.obtained_via.value)
            if stored is not None else
            PolicyInput(user_id, server.name, server.key, tuple(cfg.scopes), cfg.audience, None, server.mode.value))
    try:
        enforce(rt.policy, data)
    except PolicyDenied:
        return POLICY_DENIED
    return None


def plan_warm(rt: Runtime, user_id: str, servers: Iterable[ServerConfig]) -> WarmPlan:
    """Decide per server whether a warm can do anything (store reads only)."""
    plan = WarmPlan(user_id)
    subject: SubjectToken | None = None
    subject_read = False
    now = rt.clock.now()
    for server in servers:
        stored = rt.store.get(user_id, server.key)
        if server.mode is not Mode.OAUTH_CONNECT and (stored is None or stored.credential.is_expired(now)) \
                and not subject_read:
            subject, subject_read = rt.store.get_subject_token(user_id), True
        reason = skip_reason(rt, user_id, server, stored, subject, now)
        if reason is None:
            plan.fly.append(server)
        else:
            plan.skipped.append({"server": server.name, "reason": reason})
    return plan


def send_warm(rt: Runtime, plan: WarmPlan, send: Send, task_name: str) -> list[str]:
    """Start a flight per planned server unless one is in flight already (then
    the warm is that flight). Returns the task ids started, to wait on."""
    started: list[str] = []
    claim_ms = int(rt.settings.resolve_timeout * 1000) + 5000
    for server in plan.fly:
        key = flight_key(plan.user_id, server.key)
        task_id = new_task_id()
        if not rt.claims.claim(key, task_id, claim_ms):
            continue  # joined the flight in progress
        try:
            send(task_name, [plan.user_id, server.name], task_id)
        except Exception:
            rt.claims.release(key, task_id)
            raise
        started.append(task_id)
    return started


def warm_user(rt: Runtime, user_id: str, server_names: list[str] | None, send: Send, task_name: str,
              *, exchange_only: bool = False) -> tuple[WarmPlan, list[str]]:
    """Plan and start the warm of one user; unknown servers raise ``unknown_server``."""
    if server_names is None:
        servers = [rt.servers[name] for name in rt.servers]
    else:
        servers = [rt.servers.get_server(name) for name in server_names]
    if exchange_only:
        servers = [s for s in servers if s.mode in EXCHANGE_MODES]
    plan = plan_warm(rt, user_id, servers)
    try:
        started = send_warm(rt, plan, send, task_name)
    except BrokerError:
        raise
    return plan, started
