"""OAuth and token-exchange protocol code: pure builders and parsers, one thin sender.

    pkce        PKCE verifier/challenge and connect state
    forms       request builders (RFC 8693, Entra OBO, RFC 6749, RFC 7009) and client auth
    assertion   RFC 7523 client assertions (private_key_jwt)
    responses   token / error response parsers (secret-free errors)
    backoff     retry timing
    sender      httpx sender: bounded body, bounded retries
    discovery   RFC 8414 / OIDC metadata with a per-issuer cache
    client      OAuthClient, the port the resolver uses
"""

from .backoff import compute_backoff, retry_delay
from .client import OAuthClient, OnCall, call_result
from .discovery import MetadataCache, resolve_endpoints
from .forms import (
    TokenRequest,
    authorization_code_request,
    authorize_url,
    obo_request,
    refresh_request,
    revocation_request,
    token_exchange_request,
)
from .pkce import new_state, new_verifier, s256_challenge
from .responses import parse_error_response, parse_token_response
from .sender import MAX_BODY_BYTES, TokenEndpointSender, make_http_client

__all__ = [
    "MAX_BODY_BYTES",
    "MetadataCache",
    "OAuthClient",
    "OnCall",
    "TokenEndpointSender",
    "TokenRequest",
    "authorization_code_request",
    "authorize_url",
    "call_result",
    "compute_backoff",
    "make_http_client",
    "new_state",
    "new_verifier",
    "obo_request",
    "parse_error_response",
    "parse_token_response",
    "refresh_request",
    "resolve_endpoints",
    "retry_delay",
    "revocation_request",
    "s256_challenge",
    "token_exchange_request",
]
