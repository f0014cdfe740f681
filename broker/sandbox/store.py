"""In-memory records of codes, refresh-token families and revoked tokens.

Not thread-safe by itself: :class:`~broker.sandbox.state.SandboxProvider`
holds its lock around every use, so a grant's check-then-mark is atomic.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

__all__ = ["AuthCode", "Family", "RefreshRecord", "TokenStore", "CODE_TTL", "REFRESH_PREFIX"]

# RFC 6749 §4.1.2 recommends at most ten minutes; one keeps tests honest.
CODE_TTL = 60
REFRESH_PREFIX = "sbx_rt_"
# Used codes are kept a while after expiry so a late replay is still seen as reuse.
_CODE_RETENTION = 600


@dataclass
class AuthCode:
    """An authorization code bound to its client, redirect URI and PKCE challenge."""

    code: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    user: str
    resource: list[str]
    expires_at: float
    offline: bool = True  # whether redeeming it earns a refresh token
    used: bool = False
    family_id: str | None = None


@dataclass
class Family:
    """Every token descended from one authorization, revoked as a unit."""

    family_id: str
    client_id: str
    sub: str
    scope: str
    aud: list[str]
    revoked: bool = False
    refresh_tokens: list[str] = field(default_factory=list)
    access_jtis: set[str] = field(default_factory=set)
    jkt: str | None = None  # DPoP: the key its refresh tokens are bound to


@dataclass
class RefreshRecord:
    """One opaque refresh token; ``used`` is set when rotation replaced it."""

    token: str
    family_id: str
    used: bool = False
    used_at: float = 0.0
    # Issued or last redeemed (provider clock): idle expiry counts from here.
    active_at: float = 0.0


@dataclass
class TokenStore:
    """All token state of one provider."""

    codes: dict[str, AuthCode] = field(default_factory=dict)
    refresh: dict[str, RefreshRecord] = field(default_factory=dict)
    families: dict[str, Family] = field(default_factory=dict)
    revoked_jtis: set[str] = field(default_factory=set)
    # Opaque access token -> the signed one it stands for (profiles without JWTs).
    opaque: dict[str, str] = field(default_factory=dict)

    def new_code(
        self,
        now: float,
        *,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        scope: str,
        user: str,
        resource: list[str],
        offline: bool = True,
    ) -> AuthCode:
        """Mint a single-use code, forgetting codes long past their expiry."""
        for stale in [c for c, rec in self.codes.items() if rec.expires_at + _CODE_RETENTION < now]:
            del self.codes[stale]
        code = AuthCode(
            code="sbx_ac_" + secrets.token_urlsafe(32),
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            scope=scope,
            user=user,
            resource=resource,
            expires_at=now + CODE_TTL,
            offline=offline,
        )
        self.codes[code.code] = code
        return code

    def new_family(self, *, client_id: str, sub: str, scope: str, aud: list[str]) -> Family:
        family = Family(family_id=secrets.token_hex(16), client_id=client_id, sub=sub, scope=scope, aud=aud)
        self.families[family.family_id] = family
        return family

    def new_refresh(self, family: Family) -> RefreshRecord:
        record = RefreshRecord(token=REFRESH_PREFIX + secrets.token_urlsafe(32), family_id=family.family_id)
        self.refresh[record.token] = record
        family.refresh_tokens.append(record.token)
        return record

    def revoke_family(self, family_id: str) -> None:
        """Revoke the family's refresh tokens and the access tokens it issued (RFC 7009 §2.1)."""
        family = self.families[family_id]
        family.revoked = True
        self.revoked_jtis |= family.access_jtis

    def refresh_active(self, token: str, *, rotation: bool) -> bool:
        record = self.refresh.get(token)
        if record is None or self.families[record.family_id].revoked:
            return False
        return not (rotation and record.used)
