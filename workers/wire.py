"""The sealed envelope a flight returns and the fast-path cache holds.

Plaintext never touches Redis: the envelope is sealed with the transport key
and bound to the Redis key (or task id) it lives under.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from broker.audit import Action, Outcome
from broker.crypto import Sealer
from broker.dpop import DPoPKey
from broker.models import Credential, ObtainedVia
from broker.resolver import Acquisition
from broker.secret import Secret

__all__ = ["to_envelope", "from_envelope", "seal_envelope", "open_envelope", "result_purpose", "connect_url_purpose"]


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def result_purpose(task_id: str) -> str:
    return "result:" + task_id


def connect_url_purpose(task_id: str) -> str:
    return "connect-url:" + task_id


def to_envelope(user_id: str, server_key: str, acq: Acquisition) -> dict[str, Any]:
    c = acq.credential
    env = {
        "v": 1, "u": user_id, "k": server_key, "a": c.access_token.reveal(), "tt": c.token_type,
        "exp": _ts(c.expires_at), "iat": _ts(c.issued_at), "sc": list(c.scopes), "aud": c.audience,
        "via": c.obtained_via.value, "act": acq.action.value, "out": acq.outcome.value, "rsn": acq.reason,
    }
    if c.dpop_key is not None:
        # The caller mints DPoP proofs itself, so the key rides along, sealed like the token.
        env["dk"] = c.dpop_key.to_private_jwk()
    return env


def from_envelope(env: dict[str, Any], user_id: str, server_key: str) -> Acquisition:
    """Rebuild an acquisition; refuses an envelope made for another pair."""
    if env.get("v") != 1 or env.get("u") != user_id or env.get("k") != server_key:
        raise ValueError("envelope is not for this user and server")
    cred = Credential(
        access_token=Secret(env["a"]), obtained_via=ObtainedVia(env["via"]), token_type=env["tt"],
        expires_at=_dt(env.get("exp")), issued_at=_dt(env.get("iat")), scopes=tuple(env.get("sc") or ()),
        audience=env.get("aud"), dpop_key=DPoPKey.from_private_jwk(env["dk"]) if env.get("dk") else None,
    )
    return Acquisition(cred, Action(env["act"]), Outcome(env["out"]), env.get("rsn"))


def seal_envelope(sealer: Sealer, env: dict[str, Any], purpose: str) -> str:
    return sealer.seal_json(env, purpose)


def open_envelope(sealer: Sealer, blob: str | bytes, purpose: str) -> dict[str, Any]:
    value = sealer.open_json(blob, purpose)
    if not isinstance(value, dict):
        raise ValueError("envelope is not an object")
    return value
