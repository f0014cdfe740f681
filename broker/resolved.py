"""What a resolve hands out: the header, and for DPoP servers a fresh proof.

Pure apart from the wall clock read for a proof's ``iat`` (pass ``now`` to
pin it). ``broker.resolver`` decides which credential; this module turns it
into headers, in whichever process the caller runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from .dpop import DPoPKey, dpop_proof
from .errors import InvalidRequest, UpstreamError
from .headers import apply_header, render_header_value
from .models import Credential
from .secret import Secret
from .servers import ServerConfig

__all__ = ["Resolved", "resolved_from", "check_request_target", "check_nonce", "unbound"]

_METHOD = re.compile(r"[A-Za-z]{1,16}")  # GET, POST, PATCH...: an RFC 9110 token, kept simple
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_NONCE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,512}")  # RFC 9449 NQCHAR


@dataclass(frozen=True)
class Resolved:
    """The header to inject for (user, server) now, plus non-secret metadata."""

    server: str
    header: str
    value: Secret
    token_type: str
    expires_at: datetime | None
    obtained_via: str
    # DPoP servers: the ``DPoP`` proof for the method and URL the resolve named.
    dpop: Secret | None = None
    # DPoP servers: the bound key and token, so more proofs can be minted here.
    dpop_key: DPoPKey | None = field(default=None, repr=False, compare=False)
    _token: Secret | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The contract's resolve body; the header value is revealed here only."""
        body = {
            "server": self.server,
            "header": self.header,
            "value": self.value.reveal(),
            "token_type": self.token_type,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "obtained_via": self.obtained_via,
        }
        if self.dpop_key is not None:
            body["dpop"] = {"header": "DPoP", "value": self.dpop.reveal() if self.dpop else None}
        return body

    def dpop_proof(self, method: str, url: str, now: float | None = None, nonce: str | None = None) -> Secret:
        """A fresh DPoP proof for one more request with this token (each proof is single-use)."""
        if self.dpop_key is None or self._token is None:
            raise InvalidRequest(f"server {self.server!r} does not use DPoP")
        check_request_target(method, url)
        stamp = time.time() if now is None else now
        return Secret(dpop_proof(self.dpop_key, method, url, stamp, nonce=check_nonce(nonce),
                                 access_token=self._token.reveal()))

    def apply(self, headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
        """Set the header (and the DPoP proof), replacing same-named ones (case-insensitively)."""
        apply_header(headers, self.header, self.value)
        if self.dpop is not None:
            apply_header(headers, "DPoP", self.dpop)
        return headers


def unbound(server: ServerConfig, cred: Credential) -> bool:
    """A DPoP server's credential without a key (stored before ``dpop: true``):
    unusable as it is, so it is renewed now rather than served."""
    return server.auth_broker.dpop and cred.dpop_key is None


def check_nonce(nonce: str | None) -> str | None:
    """A resource server's ``DPoP-Nonce`` (RFC 9449 section 9): NQCHARs, bounded."""
    if nonce is not None and (not isinstance(nonce, str) or not _NONCE.fullmatch(nonce)):
        raise InvalidRequest("dpop_nonce must be 1-512 printable ASCII characters without spaces, quotes or backslashes")
    return nonce


def check_request_target(method: str, url: str) -> None:
    """A DPoP proof names one request: an HTTP method token and an absolute http(s) URL."""
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise InvalidRequest("method must be an HTTP method such as GET or POST")
    if not isinstance(url, str) or len(url) > 4096 or _CONTROL.search(url):
        raise InvalidRequest("url must be an absolute http or https URL")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("url must be an absolute http or https URL")


def resolved_from(server: ServerConfig, cred: Credential, *, method: str | None = None,
                  url: str | None = None, now: float | None = None, dpop_nonce: str | None = None) -> Resolved:
    """The header to inject for a credential, per the server's header config;
    for a DPoP server with a request target, a fresh proof for it."""
    cfg = server.auth_broker
    value = render_header_value(cfg.header_format, cred.access_token)
    if not cfg.dpop or cred.dpop_key is None:
        if cfg.dpop:
            raise UpstreamError("credential is not bound to a DPoP key; it must be renewed")
        return Resolved(server=server.name, header=cfg.header, value=value, token_type=cred.token_type,
                        expires_at=cred.expires_at, obtained_via=cred.obtained_via.value)
    if (method is None) != (url is None):
        raise InvalidRequest("give both method and url, or neither")
    proof = None
    if method is not None and url is not None:
        check_request_target(method, url)
        stamp = time.time() if now is None else now
        proof = Secret(dpop_proof(cred.dpop_key, method, url, stamp, nonce=check_nonce(dpop_nonce),
                                  access_token=cred.access_token.reveal()))
    return Resolved(server=server.name, header=cfg.header, value=value, token_type=cred.token_type,
                    expires_at=cred.expires_at, obtained_via=cred.obtained_via.value, dpop=proof,
                    dpop_key=cred.dpop_key, _token=cred.access_token)
