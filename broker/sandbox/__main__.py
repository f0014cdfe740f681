"""``python -m broker.sandbox``: the sandbox provider as its own process.

For the benchmark, the demo and Celery workers in other processes; prints
the base URL as one line on stdout once it answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .profiles import SANDBOX_PROFILES
from .server import serve_forever
from .state import SandboxProvider

__all__ = ["main"]


def _client(text: str) -> tuple[str, str | None]:
    client_id, sep, secret = text.partition(":")
    if not client_id:
        raise argparse.ArgumentTypeError("expected ID:SECRET, or ID for a public client")
    return client_id, (secret if sep else None)


def _client_profile(text: str) -> tuple[str, str]:
    client_id, _, profile = text.partition("=")
    if not client_id or profile not in SANDBOX_PROFILES:
        raise argparse.ArgumentTypeError(f"expected ID=PROFILE, PROFILE one of {', '.join(SANDBOX_PROFILES)}")
    return client_id, profile


def _client_jwk(text: str) -> tuple[str, dict[str, Any]]:
    """``ID=FILE``: FILE holds a public JWK, or ``{"keys": [jwk]}`` as ``credbroker keygen --jwk`` prints it."""
    client_id, _, path = text.partition("=")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise argparse.ArgumentTypeError("expected ID=FILE, FILE a readable JSON JWK or JWK set") from None
    jwk = data["keys"][0] if isinstance(data, dict) and isinstance(data.get("keys"), list) and data["keys"] else data
    if not client_id or not isinstance(jwk, dict) or "kty" not in jwk or "d" in jwk:
        raise argparse.ArgumentTypeError("expected ID=FILE with a public JWK (no private part)")
    return client_id, jwk


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker.sandbox", description="Sandbox OAuth authorization server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900, help="0 picks a free port")
    parser.add_argument("--access-token-ttl", type=int, default=3600, metavar="N")
    parser.add_argument("--latency-ms", type=int, default=0, metavar="N", help="delay on every /token request")
    parser.add_argument("--no-rotate", action="store_true", help="keep refresh tokens valid after use")
    parser.add_argument("--clock-skew", type=int, default=0, metavar="N", help="seconds added to issued iat/exp")
    parser.add_argument("--client", type=_client, action="append", metavar="ID[:SECRET]",
                        help="register a client (repeatable); replaces the default clients")
    parser.add_argument("--client-profile", type=_client_profile, action="append", metavar="ID=PROFILE",
                        help="serve a client as that provider does (github, slack, google...); repeatable")
    parser.add_argument("--client-jwk", type=_client_jwk, action="append", metavar="ID=FILE",
                        help="register a private_key_jwt client by its public JWK (file); repeatable")
    parser.add_argument("--dpop-nonce", metavar="NONCE", help="DPoP proofs at /token must carry this nonce")
    parser.add_argument("--log-level", default="warning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    provider = SandboxProvider(
        clients=dict(args.client) if args.client else None,
        access_token_ttl=args.access_token_ttl,
        rotate_refresh_tokens=not args.no_rotate,
        clock_skew=args.clock_skew,
        latency_ms={"token": args.latency_ms} if args.latency_ms > 0 else None,
        client_profiles=dict(args.client_profile) if args.client_profile else None,
        client_jwks=dict(args.client_jwk) if args.client_jwk else None,
        dpop_nonce=args.dpop_nonce,
    )
    try:
        serve_forever(provider, args.host, args.port, announce=lambda url: print(url, flush=True),
                      log_level=args.log_level)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
