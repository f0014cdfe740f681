"""The sandbox provider's state: configuration, tokens, counters and faults.

One object, guarded by one lock, shared by the HTTP app (its event-loop
thread) and by tests calling the Python API from other threads.
"""

from __future__ import annotations

import copy
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import jwt
from .faults import ENDPOINTS, FAULT_MODES, Fault
from .profiles import ProfileBehaviour, behaviour_for, check_profile_name
from .store import TokenStore

__all__ = ["SandboxProvider", "DEFAULT_CLIENTS", "GRANT_NAMES"]

DEFAULT_CLIENTS: dict[str, str | None] = {
    "broker-client": "sandbox-client-secret-s3cr3t",
    "public-client": None,
}
GRANT_NAMES = ("token_exchange", "obo", "authorization_code", "refresh_token", "password", "id_jag", "id_jag_grant")
_CONFIGURABLE = ("access_token_ttl", "rotate_refresh_tokens", "clock_skew", "clients", "refresh_reuse_grace",
                 "client_profiles", "grantable_scopes", "revoke_family", "client_jwks", "dpop_nonce",
                 "resource_dpop_nonce", "refresh_idle_seconds")
# Fallback ``iss`` until the provider is served and knows its own URL.
_UNSERVED_ISSUER = "urn:sandbox:unserved"


class SandboxProvider:
    """A fake authorization server's state; see ``sandbox`` for the HTTP side."""

    def __init__(
        self,
        *,
        clients: dict[str, str | None] | None = None,
        access_token_ttl: int = 3600,
        rotate_refresh_tokens: bool = True,
        clock_skew: int = 0,
        refresh_reuse_grace: float = 0.0,
        client_profiles: dict[str, str] | None = None,
        grantable_scopes: list[str] | None = None,
        refresh_idle_seconds: float = 0.0,
        revoke_family: bool = True,
        client_jwks: dict[str, dict[str, str]] | None = None,
        dpop_nonce: str | None = None,
        resource_dpop_nonce: str | None = None,
        issuer: str = "",
        latency_ms: dict[str, int] | None = None,
        clock: Callable[[], float] = time.time,
        max_recorded_requests: int = 10_000,
    ) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self.issuer = issuer
        self._key = secrets.token_bytes(32)
        self._initial: dict[str, Any] = {
            "clients": dict(DEFAULT_CLIENTS if clients is None else clients),
            "access_token_ttl": access_token_ttl,
            "rotate_refresh_tokens": rotate_refresh_tokens,
            "clock_skew": clock_skew,
            "refresh_reuse_grace": refresh_reuse_grace,
            # client_id -> sandbox profile name (see ``profiles``): that provider's behaviour.
            "client_profiles": {k: check_profile_name(v) for k, v in (client_profiles or {}).items()},
            # None: consent grants every requested scope; else only these (a narrowed grant).
            "grantable_scopes": None if grantable_scopes is None else list(grantable_scopes),
            # Refresh tokens unused this long die of disuse (Google, Atlassian); 0: never.
            "refresh_idle_seconds": refresh_idle_seconds,
            "revoke_family": revoke_family,
            # client_id -> registered public JWK: those clients authenticate with private_key_jwt.
            "client_jwks": {str(k): dict(v) for k, v in (client_jwks or {}).items()},
            # Set: DPoP proofs at the token endpoint must carry this nonce (RFC 9449 section 8).
            "dpop_nonce": dpop_nonce,
            # Set: proofs at /test/resource must carry this nonce (RFC 9449 section 9).
            "resource_dpop_nonce": resource_dpop_nonce,
        }
        self._initial_latency = dict(latency_ms or {})
        for endpoint in self._initial_latency:
            _check_endpoint(endpoint)
        self._max_recorded = max_recorded_requests
        self.clients: dict[str, str | None] = {}
        self.access_token_ttl = access_token_ttl
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.clock_skew = clock_skew
        self.refresh_reuse_grace = refresh_reuse_grace
        self.client_profiles: dict[str, str] = {}
        self.grantable_scopes: list[str] | None = None
        self.refresh_idle_seconds = refresh_idle_seconds
        # False: revoking a refresh token kills only that token, as some
        # providers do (RFC 7009 leaves it open), not its whole family.
        self.revoke_family = revoke_family
        self.client_jwks: dict[str, dict[str, str]] = {}
        self.dpop_nonce: str | None = None
        self.resource_dpop_nonce: str | None = None
        self.reset()

    # -- configuration -----------------------------------------------------

    def configure(self, **kwargs: Any) -> None:
        """Change ``access_token_ttl``, ``rotate_refresh_tokens``, ``clock_skew``, ``clients``,
        ``refresh_reuse_grace``, ``client_profiles`` or ``grantable_scopes`` live."""
        unknown = set(kwargs) - set(_CONFIGURABLE)
        if unknown:
            raise TypeError(f"not configurable: {', '.join(sorted(unknown))}")
        with self.lock:
            for name, value in kwargs.items():
                if name == "clients":
                    value = dict(value)
                elif name == "client_profiles":
                    value = {str(k): check_profile_name(str(v)) for k, v in dict(value).items()}
                elif name == "grantable_scopes":
                    value = None if value is None else [str(v) for v in value]
                elif name == "client_jwks":
                    value = {str(k): dict(v) for k, v in dict(value).items()}
                elif name in ("dpop_nonce", "resource_dpop_nonce"):
                    value = None if value is None else str(value)
                elif name == "refresh_reuse_grace":
                    value = float(value)
                elif name in ("rotate_refresh_tokens", "revoke_family"):
                    value = bool(value)
                elif name == "refresh_idle_seconds":
                    value = float(value)
                else:
                    value = int(value)
                setattr(self, name, value)

    def reset(self) -> None:
        """Forget every token, count, request and fault; restore constructor settings and latency.

        The signing key and issuer stay, so a served provider keeps its identity.
        """
        with self.lock:
            for name, value in self._initial.items():
                setattr(self, name, copy.deepcopy(value))
            self.store = TokenStore()
            self._faults: dict[str, Fault] = {}
            self._latency_ms: dict[str, int] = {k: v for k, v in self._initial_latency.items() if v > 0}
            self._requests: deque[dict[str, Any]] = deque(maxlen=self._max_recorded)
            self._grants = dict.fromkeys(GRANT_NAMES, 0)
            self._by_user: dict[str, dict[str, int]] = {}
            self._errors: dict[str, int] = {}
            self._revocations = 0
            self.used_assertion_jtis: set[str] = set()  # ID-JAGs already redeemed (replay)
            self._reuse_detected = 0
            self._grace_reuses = 0
            self._refresh_rotations = 0
            # refresh token -> times presented, and the tokens presented twice or more per user
            self._presented: dict[str, int] = {}
            self._presented_twice_by_user: dict[str, int] = {}
            self._arrivals: dict[str, int] = {}  # requests that reached the front door, per endpoint
            # Requests being handled now, and the most at once, per endpoint: what a
            # client's concurrency limit is checked against.
            self._in_flight: dict[str, int] = {}
            self._max_in_flight: dict[str, int] = {}
            self._faults_served = 0
            # jti -> until when it is remembered: one-time client assertions and DPoP proofs.
            self.seen_assertion_jtis: dict[str, float] = {}
            self.seen_proof_jtis: dict[str, float] = {}
            self._dpop_bound = 0
            self._resource_calls = {"ok": 0, "rejected": 0}

    # -- tokens ------------------------------------------------------------

    def behaviour(self, client_id: str | None) -> ProfileBehaviour:
        """The provider profile ``client_id`` is served with (plain when none)."""
        with self.lock:
            return behaviour_for(self.client_profiles, client_id)

    def ttl_for(self, client_id: str | None) -> int:
        ttl = self.behaviour(client_id).access_token_ttl
        return self.access_token_ttl if ttl is None else ttl

    def grant_scope(self, requested: str) -> str:
        """The scope consent grants: the requested one, narrowed to ``grantable_scopes`` if set."""
        with self.lock:
            if self.grantable_scopes is None:
                return requested
            return " ".join(s for s in requested.split() if s in self.grantable_scopes)

    def opaque_for(self, access_token: str) -> str:
        """An opaque stand-in for a signed access token (providers whose tokens are not JWTs)."""
        with self.lock:
            opaque = "sbx_at_" + secrets.token_urlsafe(32)
            self.store.opaque[opaque] = access_token
            return opaque

    def now(self) -> float:
        return self.clock()

    def _issuer(self) -> str:
        return self.issuer or _UNSERVED_ISSUER

    def issue_subject_token(self, user_id: str, ttl: int = 3600) -> str:
        """The user's IdP token, the subject of token exchange and OBO.

        A negative ``ttl`` gives a token that is already expired.
        """
        now = int(self.now())
        claims = {
            "iss": self._issuer(),
            "sub": user_id,
            "aud": self._issuer(),
            "iat": now,
            "exp": now + int(ttl),
            "jti": secrets.token_hex(16),
            "token_use": "subject",
        }
        return jwt.encode(claims, self._key)

    def mint_access_token(
        self, *, sub: str, aud: list[str], scope: str, client_id: str, family_id: str | None = None
    ) -> str:
        """An upstream access token; ``clock_skew`` shifts its ``iat`` and ``exp``."""
        with self.lock:
            issued = int(self.now()) + self.clock_skew
            ttl = self.ttl_for(client_id)
            claims: dict[str, Any] = {
                "iss": self._issuer(),
                "sub": sub,
                "aud": aud[0] if len(aud) == 1 else aud,
                "scope": scope,
                "client_id": client_id,
                "iat": issued,
                "exp": issued + ttl,
                "jti": secrets.token_hex(16),
                "token_use": "access",
            }
            if family_id is not None:
                self.store.families[family_id].access_jtis.add(claims["jti"])
            return jwt.encode(claims, self._key)

    def mint_id_jag(self, *, sub: str, aud: str, resource: str | None, scope: str, client_id: str,
                    ttl: int = 300) -> str:
        """An Identity Assertion JWT Authorization Grant (SEP-990 leg 1), for ``aud``'s AS."""
        now = int(self.now())
        claims: dict[str, Any] = {"iss": self._issuer(), "sub": sub, "aud": aud, "client_id": client_id,
                                  "scope": scope, "iat": now, "exp": now + ttl, "jti": secrets.token_hex(16),
                                  "token_use": "id_jag"}
        if resource:
            claims["resource"] = resource
        return jwt.encode(claims, self._key)

    def decode_token(self, token: str) -> dict[str, Any]:
        """Claims of a JWT this provider signed; raises :class:`jwt.JWTError` otherwise."""
        return jwt.decode(token, self._key)

    # -- counters ----------------------------------------------------------

    def count_grant(self, grant: str, sub: str) -> None:
        with self.lock:
            self._grants[grant] += 1
            per_user = self._by_user.setdefault(sub, {})
            per_user[grant] = per_user.get(grant, 0) + 1

    def count_error(self, error: str) -> None:
        with self.lock:
            self._errors[error] = self._errors.get(error, 0) + 1

    def count_revocation(self) -> None:
        with self.lock:
            self._revocations += 1

    def count_reuse(self) -> None:
        with self.lock:
            self._reuse_detected += 1

    def count_grace_reuse(self) -> None:
        with self.lock:
            self._grace_reuses += 1

    def count_dpop_bound(self) -> None:
        with self.lock:
            self._dpop_bound += 1

    def count_resource_call(self, ok: bool) -> None:
        with self.lock:
            self._resource_calls["ok" if ok else "rejected"] += 1

    def bind_to_dpop_key(self, body: dict[str, Any], jkt: str) -> dict[str, Any]:
        """Re-sign the issued access token with ``cnf.jkt`` (RFC 9449 section 6) and
        bind the refresh token family to the same key."""
        with self.lock:
            token = self.store.opaque.get(body["access_token"], body["access_token"])
            claims = jwt.decode(token, self._key)
            claims["cnf"] = {"jkt": jkt}
            refresh = body.get("refresh_token")
            if refresh and refresh in self.store.refresh:
                self.store.families[self.store.refresh[refresh].family_id].jkt = jkt
            self._dpop_bound += 1
            return {**body, "access_token": jwt.encode(claims, self._key), "token_type": "DPoP"}

    def count_arrival(self, endpoint: str) -> None:
        """A request reached the front door; ``count_departure`` when it is answered."""
        with self.lock:
            self._arrivals[endpoint] = self._arrivals.get(endpoint, 0) + 1
            now = self._in_flight[endpoint] = self._in_flight.get(endpoint, 0) + 1
            self._max_in_flight[endpoint] = max(self._max_in_flight.get(endpoint, 0), now)

    def count_departure(self, endpoint: str) -> None:
        with self.lock:
            # max(): a reset() while requests were in flight started the count over.
            self._in_flight[endpoint] = max(0, self._in_flight.get(endpoint, 0) - 1)

    def count_presentation(self, token: str, sub: str) -> None:
        """A known refresh token was presented; the second time counts it as reused."""
        with self.lock:
            n = self._presented.get(token, 0) + 1
            self._presented[token] = n
            if n == 2:
                self._presented_twice_by_user[sub] = self._presented_twice_by_user.get(sub, 0) + 1

    def count_rotation(self) -> None:
        with self.lock:
            self._refresh_rotations += 1

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, safe to keep and compare."""
        with self.lock:
            return {
                "grants": dict(self._grants),
                "by_user": copy.deepcopy(self._by_user),
                "revocations": self._revocations,
                "reuse_detected": self._reuse_detected,
                "grace_reuses": self._grace_reuses,
                "refresh_rotations": self._refresh_rotations,
                "refresh_presentations": sum(self._presented.values()),
                "refresh_presented_twice": sum(self._presented_twice_by_user.values()),
                "presented_twice_by_user": dict(self._presented_twice_by_user),
                "arrivals": dict(self._arrivals),
                "max_in_flight": dict(self._max_in_flight),
                "errors": dict(self._errors),
                "faults_served": self._faults_served,
                "dpop_bound_tokens": self._dpop_bound,
                "resource_calls": dict(self._resource_calls),
            }

    # -- request log -------------------------------------------------------

    def record_request(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self._requests.append(entry)

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Recorded requests, oldest first, optionally for one endpoint only."""
        with self.lock:
            return [copy.deepcopy(r) for r in self._requests if endpoint is None or r["endpoint"] == endpoint]

    # -- faults and latency ------------------------------------------------

    def set_fault(
        self,
        endpoint: str,
        mode: str | None,
        count: int | None = None,
        retry_after: int = 1,
        hang_seconds: float = 30,
    ) -> None:
        """Arm ``mode`` for the next ``count`` requests (None: until cleared); mode None clears."""
        _check_endpoint(endpoint)
        with self.lock:
            if mode is None:
                self._faults.pop(endpoint, None)
                return
            if mode not in FAULT_MODES:
                raise ValueError(f"unknown fault mode {mode!r}; one of {sorted(FAULT_MODES)}")
            if count is not None and count <= 0:
                self._faults.pop(endpoint, None)
                return
            self._faults[endpoint] = Fault(mode, count, int(retry_after), float(hang_seconds))

    def faults(self) -> dict[str, dict[str, object]]:
        with self.lock:
            return {endpoint: fault.as_dict() for endpoint, fault in self._faults.items()}

    def take_fault(self, endpoint: str) -> Fault | None:
        """Consume one use of the endpoint's armed fault, if any."""
        with self.lock:
            fault = self._faults.get(endpoint)
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[endpoint]
            self._faults_served += 1
            return copy.copy(fault)

    def set_latency(self, endpoint: str, ms: int) -> None:
        """Delay every request to ``endpoint`` by ``ms`` milliseconds (0 clears)."""
        _check_endpoint(endpoint)
        with self.lock:
            if ms <= 0:
                self._latency_ms.pop(endpoint, None)
            else:
                self._latency_ms[endpoint] = int(ms)

    def latency_seconds(self, endpoint: str) -> float:
        with self.lock:
            return self._latency_ms.get(endpoint, 0) / 1000


def _check_endpoint(endpoint: str) -> None:
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; one of {sorted(ENDPOINTS)}")
