"""Token revocation (RFC 7009) and a minimal introspection (RFC 7662).

Introspection exists so tests can see that a revoked access token is dead,
since the sandbox's access tokens are self-contained JWTs.
"""

from __future__ import annotations

from typing import Any

from .jwt import JWTError
from .state import SandboxProvider

__all__ = ["revoke", "introspect"]


def revoke(provider: SandboxProvider, client_id: str, token: str) -> bool:
    """Revoke ``token`` if this client owns it; True when it was recognised.

    An unknown token is not an error (RFC 7009 §2.2): the caller answers 200
    either way. A refresh token takes its whole family with it.
    """
    with provider.lock:
        store = provider.store
        token = store.opaque.get(token, token)  # an opaque access token stands for a signed one
        record = store.refresh.get(token)
        if record is not None:
            family = store.families[record.family_id]
            if family.client_id != client_id:
                return False
            if provider.revoke_family:
                store.revoke_family(family.family_id)
            else:
                del store.refresh[token]  # this token only; its successors stay live
            provider.count_revocation()
            return True
        try:
            claims = provider.decode_token(token)
        except JWTError:
            return False
        if claims.get("token_use") != "access" or claims.get("client_id") != client_id:
            return False
        store.revoked_jtis.add(str(claims.get("jti")))
        provider.count_revocation()
        return True


def introspect(provider: SandboxProvider, token: str) -> dict[str, Any]:
    """``{"active": bool}`` plus a few claims for an active token."""
    with provider.lock:
        store = provider.store
        token = store.opaque.get(token, token)
        record = store.refresh.get(token)
        if record is not None:
            family = store.families[record.family_id]
            rotate = provider.behaviour(family.client_id).rotate
            rotation = provider.rotate_refresh_tokens if rotate is None else rotate
            if not store.refresh_active(token, rotation=rotation):
                return {"active": False}
            return {
                "active": True,
                "token_type": "refresh_token",
                "sub": family.sub,
                "scope": family.scope,
                "client_id": family.client_id,
            }
        try:
            claims = provider.decode_token(token)
        except JWTError:
            return {"active": False}
        if claims.get("exp", 0) <= provider.now() or claims.get("jti") in store.revoked_jtis:
            return {"active": False}
        keep = ("sub", "aud", "scope", "client_id", "iat", "exp", "iss", "jti", "token_use")
        return {"active": True, "token_type": "Bearer", **{k: claims[k] for k in keep if k in claims}}
