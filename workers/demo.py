"""``credbroker up --demo``: the sandbox identity provider and one demo server per mode.

Everything here is for trying the broker on a laptop: the sandbox's client
secret is its public default, the demo API key is printed, and the files live
in the state folder.
"""

from __future__ import annotations

import json
import secrets
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from broker.clock import utcnow
from broker.models import SubjectToken
from broker.sandbox import DEFAULT_CLIENTS
from broker.secret import Secret
from broker.servers import load_servers
from broker.store import CredentialStore

__all__ = ["DEMO_USER", "DEMO_SERVERS", "demo_servers", "write_servers_file", "demo_api_key",
           "seed_subject_token", "forget_demo_user", "instructions"]

DEMO_USER = "demo-user"
DEMO_SERVERS = {"demo-exchange": "token_exchange", "demo-obo": "entra_obo", "demo-connect": "oauth_connect"}
SERVERS_FILE = "demo-servers.yaml"
API_KEY_FILE = "demo-api-key"
_CLIENT_ID = "broker-client"


def demo_servers(sandbox_url: str) -> list[dict[str, Any]]:
    """One server per mode, all against the sandbox provider."""
    client = {"token_endpoint": f"{sandbox_url}/token", "client_id": _CLIENT_ID,
              "client_secret": DEFAULT_CLIENTS[_CLIENT_ID]}
    return [
        {"name": "demo-exchange", "url": "https://demo-exchange.example.com/mcp",
         "auth_broker": {"mode": "token_exchange", **client, "audience": "demo-api", "scopes": ["read"]}},
        {"name": "demo-obo", "url": "https://demo-obo.example.com/mcp",
         "auth_broker": {"mode": "entra_obo", **client, "scopes": ["api://demo-obo/.default"]}},
        {"name": "demo-connect", "url": "https://demo-connect.example.com/mcp",
         "auth_broker": {"mode": "oauth_connect", **client, "authorization_endpoint": f"{sandbox_url}/authorize",
                         "revocation_endpoint": f"{sandbox_url}/revoke", "scopes": ["repo"]}},
    ]


def write_servers_file(folder: Path, sandbox_url: str) -> Path:
    """Write (0600: it holds the sandbox client secret) and validate the demo servers file."""
    path = folder / SERVERS_FILE
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump({"servers": demo_servers(sandbox_url)}, sort_keys=False), encoding="utf-8")
    load_servers(path)  # our own file must pass our own checks
    return path


def demo_api_key(folder: Path) -> str:
    """The demo's service bearer key, generated once into the state folder."""
    from .embedded import secret_file

    value, _ = secret_file(folder / API_KEY_FILE, lambda: "cbdemo-" + secrets.token_urlsafe(24))
    return value


def seed_subject_token(store: CredentialStore, sandbox_url: str, user_id: str = DEMO_USER) -> None:
    """Store a sandbox-issued subject token for the demo user, as a gateway would at sign-in."""
    answer = httpx.post(f"{sandbox_url}/test/subject-token", json={"user_id": user_id, "ttl": 86400}, timeout=10)
    answer.raise_for_status()
    body = answer.json()
    token = SubjectToken(Secret(body["access_token"]), utcnow() + timedelta(seconds=int(body["expires_in"])))
    store.put_subject_token(user_id, token)


def forget_demo_user(store: CredentialStore, redis_client: Any, server_keys: list[str],
                     user_id: str = DEMO_USER) -> None:
    """Start every demo from scratch: the last run's sandbox issued tokens nobody knows now."""
    from .constants import cache_key

    for key in server_keys:
        store.delete(user_id, key)
        redis_client.delete(cache_key(user_id, key))


def _curl(method: str, url: str, body: dict[str, str] | None = None) -> str:
    parts = ["curl", "-s", "-X", method, url, "-H", '"Authorization: Bearer $KEY"']
    if body is not None:
        parts += ["-H", "'Content-Type: application/json'", "-d", shlex.quote(json.dumps(body))]
    return " ".join(parts)


def instructions(api_url: str, sandbox_url: str, key: str | None, session_file: Path | None = None) -> str:
    """What to type next (the README's tour is this text); the key is printed only if the demo made it."""
    key_line = f"KEY={key}" if key else "KEY=...   # one of your CREDBROKER_API_KEYS"
    resolve = {"user_id": DEMO_USER, "server": "demo-exchange"}
    connect = {"user_id": DEMO_USER, "server": "demo-connect"}
    session = str(session_file) if session_file is not None else ".credbroker/session.env"
    return "\n".join([
        "",
        "credbroker demo is running. Press Ctrl-C to stop everything.",
        f"  API:          {api_url}",
        f"  sandbox IdP:  {sandbox_url}",
        "  servers:      " + ", ".join(f"{n} ({m})" for n, m in DEMO_SERVERS.items()),
        f"  user:         {DEMO_USER}, signed in: the demo stored a sandbox subject token for this user,",
        "                as a gateway does at each sign-in (PUT /v1/users/{user_id}/subject-token)",
        "",
        f"  {key_line}",
        "",
        "  # the header to inject for demo-user on demo-exchange (RFC 8693 token exchange)",
        "  " + _curl("POST", f"{api_url}/v1/resolve", resolve),
        "",
        "  # demo-connect needs the user's consent once: get a connect URL, open it, approve",
        "  " + _curl("POST", f"{api_url}/v1/connect", connect),
        "  # ... then resolve demo-connect the same way",
        "  " + _curl("POST", f"{api_url}/v1/resolve", connect),
        "",
        "  # the user's credentials, and the audit trail (newest first)",
        "  " + _curl("GET", f"{api_url}/v1/users/{DEMO_USER}/credentials"),
        "  " + _curl("GET", f"'{api_url}/v1/audit?user_id={DEMO_USER}&limit=20'"),
        "",
        "  # credbroker commands and BrokerClient() run in this folder use these settings;",
        f"  # elsewhere, load them first: set -a; . {session}; set +a",
        "",
    ])
