"""A sandbox OAuth authorization server: real HTTP, in memory, for tests, benchmark and demo.

Stand-alone on purpose (imports nothing else from ``broker``), so it plays
the upstream identity provider exactly as a foreign server would. Speaks
RFC 8693 token exchange, Entra On-Behalf-Of, authorization code + PKCE with
rotating refresh tokens, RFC 7009 revocation, RFC 8414 metadata,
private_key_jwt client assertions (RFC 7523) and DPoP (RFC 9449, with a
protected ``/test/resource``), and can be told to fail (faults) or be slow
(latency).

    with run_sandbox() as sandbox:
        token = sandbox.provider.issue_subject_token("alice")
        httpx.post(f"{sandbox.url}/token", data={...})
"""

from .app import create_app
from .errors import OAuthError
from .faults import ENDPOINTS, FAULT_MODES
from .grants import ACCESS_TOKEN_TYPE, JWT_BEARER, JWT_TOKEN_TYPE, TOKEN_EXCHANGE, s256
from .profiles import SANDBOX_PROFILES
from .server import SandboxHandle, run_sandbox
from .state import DEFAULT_CLIENTS, GRANT_NAMES, SandboxProvider

__all__ = [
    "SandboxProvider",
    "SandboxHandle",
    "create_app",
    "run_sandbox",
    "OAuthError",
    "DEFAULT_CLIENTS",
    "GRANT_NAMES",
    "ENDPOINTS",
    "FAULT_MODES",
    "SANDBOX_PROFILES",
    "TOKEN_EXCHANGE",
    "JWT_BEARER",
    "ACCESS_TOKEN_TYPE",
    "JWT_TOKEN_TYPE",
    "s256",
]
