"""Per-user commands: ``resolve``, ``credentials``, ``users``, ``audit``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .cli_common import (
    add_command,
    check_schema,
    configure_logging,
    emit_json,
    mask_header_value,
    open_store,
    settings,
    table,
)

__all__ = ["register"]


# -- resolve ---------------------------------------------------------------------------


def cmd_resolve(args: argparse.Namespace) -> int:
    from broker.validation import validate_server_name, validate_user_id

    from .client import BrokerClient

    configure_logging()
    validate_user_id(args.user, "USER")
    validate_server_name(args.server, "SERVER")
    with BrokerClient(settings=settings()) as client:
        target = {"method": args.method, "url": args.url} if args.method or args.url else {}
        resolved = client.resolve(args.user, args.server, timeout=args.timeout, **target)
    body = resolved.to_dict()
    if not args.show_secret:
        body["value"] = mask_header_value(body["value"])
        if isinstance(body.get("dpop"), dict) and body["dpop"].get("value"):
            body["dpop"] = {**body["dpop"], "value": "<proof: --show-secret>"}
    if args.json:
        emit_json(body)
    else:
        width = max(len(k) for k in body)
        for k, v in body.items():
            print(f"{k + ':':<{width + 1}} {'-' if v is None else v}")
    return 0


# -- credentials ---------------------------------------------------------------------------


def cmd_credentials_list(args: argparse.Namespace) -> int:
    from broker.clock import utcnow
    from broker.servers import servers_from_settings
    from broker.validation import validate_user_id

    from .credentials import credential_listing

    configure_logging()
    validate_user_id(args.user, "USER")
    s = settings()
    servers = servers_from_settings(s)
    store = open_store(s)
    try:
        by_key = {c.server_key: c for c in store.list(args.user)}
    finally:
        store.engine.dispose()
    now = utcnow()
    # The same rows as GET /v1/users/{user_id}/credentials.
    rows = [credential_listing(servers[name], by_key.get(servers[name].key), now) for name in servers]
    if args.json:
        emit_json(rows)
    elif not rows:
        print("no servers configured (CREDBROKER_SERVERS_FILE)")
    else:
        table([(r["server"], r["mode"], r["status"], r["expires_at"], r["obtained_via"], " ".join(r["scopes"]),
                r["last_used_at"]) for r in rows],
              ["SERVER", "MODE", "STATUS", "EXPIRES_AT", "OBTAINED_VIA", "SCOPES", "LAST_USED_AT"])
    return 0


def _runtime() -> Any:
    """The full per-process runtime (store, Redis, connect flow), on a migrated database."""
    from broker.db import make_engine

    from .runtime import build_runtime

    s = settings()
    engine = make_engine(s.database_url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    return build_runtime(s)


def cmd_credentials_connect(args: argparse.Namespace) -> int:
    from broker.errors import StoreDisabled
    from broker.validation import validate_server_name, validate_user_id

    configure_logging()
    validate_user_id(args.user, "USER")
    validate_server_name(args.server, "SERVER")
    rt = _runtime()
    try:
        if rt.connect is None:
            raise StoreDisabled()
        start = rt.connect.start(args.user, args.server)
    finally:
        rt.close()
    if args.json:
        emit_json({"connect_url": start.connect_url, "expires_at": start.expires_at.isoformat()})
    else:
        print(start.connect_url)
        if sys.stderr.isatty():
            print(f"# open this URL as {args.user} before {start.expires_at:%H:%M:%S} UTC; it works once",
                  file=sys.stderr)
    return 0


def cmd_credentials_rm(args: argparse.Namespace) -> int:
    from broker.validation import validate_server_name, validate_user_id

    from .credentials import remove_credential

    configure_logging()
    validate_user_id(args.user, "USER")
    validate_server_name(args.server, "SERVER")
    rt = _runtime()
    try:
        deleted = remove_credential(rt, args.user, args.server)  # revokes upstream where configured
    finally:
        rt.close()
    if args.json:
        emit_json({"user_id": args.user, "server": args.server, "deleted": deleted})
    elif deleted:
        print(f"removed {args.user}'s credential for {args.server}")
    else:
        print(f"{args.user} had no credential for {args.server}; nothing to remove")
    return 0


def cmd_users_rm(args: argparse.Namespace) -> int:
    from broker.validation import validate_user_id

    from .erasure import erase_user

    configure_logging()
    validate_user_id(args.user, "USER")
    rt = _runtime()
    try:
        removed = erase_user(rt, args.user)  # revokes upstream where configured
    finally:
        rt.close()
    if args.json:
        emit_json({"user_id": args.user, "erased": True, "credentials_removed": removed})
    else:
        print(f"erased {args.user}: {removed} credential(s) revoked and deleted, subject token and pending "
              "connect links removed")
    return 0


# -- audit --------------------------------------------------------------------------------------

_AUDIT_COLUMNS = ["ts", "user_id", "server", "action", "outcome", "method", "reason", "request_id"]


def _audit_rows(events: list[dict[str, Any]]) -> list[list[Any]]:
    return [[e.get(c) for c in _AUDIT_COLUMNS] for e in events]


def cmd_audit(args: argparse.Namespace) -> int:
    from broker.audit import SqlAuditLog
    from broker.db import make_engine

    configure_logging()
    engine = make_engine(settings().database_url)
    check_schema(engine)
    log = SqlAuditLog(engine)
    try:
        events = log.query(user_id=args.user, server=args.server, limit=args.limit)  # newest first, as over HTTP
        if args.follow:
            events.reverse()  # oldest first, like a log, so new events append below
        if args.json and not args.follow:
            emit_json(events)
            return 0
        headers = [c.upper() for c in _AUDIT_COLUMNS]
        if args.json:
            for e in events:
                print(json.dumps(e, default=str), flush=True)
        else:
            table(_audit_rows(events), headers)
        if not args.follow:
            return 0
        last = max((int(e["id"]) for e in events), default=0)
        while True:
            sys.stdout.flush()
            time.sleep(args.interval)
            new = log.query(user_id=args.user, server=args.server, after_id=last, limit=1000)
            for e in new:
                if args.json:
                    print(json.dumps(e, default=str))
                else:
                    print("  ".join("-" if v is None else str(v) for v in _audit_rows([e])[0]))
                last = max(last, int(e["id"]))
    except KeyboardInterrupt:
        return 0
    finally:
        engine.dispose()


# -- registration ----------------------------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _count(text: str) -> int:
    from broker.audit import AUDIT_MAX_LIMIT

    value = int(text)
    if not 1 <= value <= AUDIT_MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {AUDIT_MAX_LIMIT}")
    return value


def register(sub: Any) -> None:
    p = add_command(sub, "resolve", "the header to inject for a user and server, now", """
        Resolve the credential for USER on SERVER through the workers, exactly
        as a gateway's BrokerClient does (cache, flight, policy, audit). The
        header value is a secret: it is masked unless --show-secret is given.
        Needs CREDBROKER_REDIS_URL, CREDBROKER_SERVERS_FILE and the transport
        or master key, and running workers.
        """, """
        credbroker resolve alice@example.com github
        credbroker resolve alice@example.com github --json
        credbroker resolve alice@example.com github --show-secret --json | jq -r .value
        """)
    p.add_argument("user", metavar="USER", help="the user id")
    p.add_argument("server", metavar="SERVER", help="the server name")
    p.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                   help="give up after this long (default CREDBROKER_RESOLVE_TIMEOUT)")
    p.add_argument("--json", action="store_true", help="print the resolve body as JSON")
    p.add_argument("--show-secret", action="store_true", help="print the header value in clear")
    p.add_argument("--method", metavar="M", help="DPoP servers: the upstream request's method (with --url)")
    p.add_argument("--url", metavar="URL", help="DPoP servers: the upstream request's URL; adds a DPoP proof")
    p.set_defaults(handler=cmd_resolve)

    creds = add_command(sub, "credentials", "a user's credentials: list, connect, rm", """
        Inspect and manage a user's per-server credentials. No secret is ever
        printed: only status and metadata.
        """, """
        credbroker credentials list alice@example.com
        credbroker credentials connect alice@example.com github
        credbroker credentials rm alice@example.com github
        """)
    csub = creds.add_subparsers(dest="credentials_command", metavar="{list,connect,rm}", required=True)
    p = add_command(csub, "list", "every configured server and the user's status on it", """
        List every configured server with the user's credential status
        (connected, degraded, expired, needs_reconnect, not_connected), its
        expiry, how it was obtained and its scopes.
        """, "credbroker credentials list alice@example.com\ncredbroker credentials list alice@example.com --json")
    p.add_argument("user", metavar="USER", help="the user id")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(handler=cmd_credentials_list)
    p = add_command(csub, "connect", "print a connect URL for an oauth_connect server", """
        Start the connect flow (authorization code + PKCE) for USER on an
        oauth_connect SERVER and print the URL the user must open. The link is
        single use and expires (CREDBROKER_STATE_TTL_SECONDS); the callback
        goes to CREDBROKER_PUBLIC_URL.
        """, "credbroker credentials connect alice@example.com github")
    p.add_argument("user", metavar="USER", help="the user id")
    p.add_argument("server", metavar="SERVER", help="an oauth_connect server")
    p.add_argument("--json", action="store_true", help="print connect_url and expires_at as JSON")
    p.set_defaults(handler=cmd_credentials_connect)
    p = add_command(csub, "rm", "revoke and delete a user's credential for a server", """
        Delete USER's credential for SERVER: revoke it at the authorization
        server where a revocation endpoint is configured (RFC 7009), delete it
        from the store, and drop it from the Redis fast-path cache.
        """, "credbroker credentials rm alice@example.com github")
    p.add_argument("user", metavar="USER", help="the user id")
    p.add_argument("server", metavar="SERVER", help="the server name")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_credentials_rm)

    users = add_command(sub, "users", "erase a user: rm", """
        Remove everything the broker holds for a user (right to erasure).
        """, "credbroker users rm alice@example.com")
    usub = users.add_subparsers(dest="users_command", metavar="{rm}", required=True)
    p = add_command(usub, "rm", "erase a user: revoke, delete credentials, subject token, pending links", """
        Erase USER: revoke each credential at its authorization server where a
        revocation endpoint is configured, delete every credential, the
        subject token, pending connect links and cached copies. The audit
        trail keeps its events under a pseudonym (erased:...), recorded as an
        erase event. Same as DELETE /v1/users/USER.
        """, "credbroker users rm alice@example.com\ncredbroker users rm alice@example.com --json")
    p.add_argument("user", metavar="USER", help="the user id")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_users_rm)

    p = add_command(sub, "audit", "the audit trail, newest first; --follow to keep watching", """
        Show the most recent audit events (resolves, refreshes, connects,
        revocations), newest first, as GET /v1/audit does (at most 1000).
        Events carry no secret. With --follow, show them oldest first, like
        a log, and keep printing new events below until Ctrl-C (JSON lines
        with --json).
        Events reach the database within a second or two of happening.
        """, """
        credbroker audit --limit 20
        credbroker audit --user alice@example.com --server github
        credbroker audit --follow --json | jq .
        """)
    p.add_argument("--user", metavar="USER", help="only this user's events")
    p.add_argument("--server", metavar="SERVER", help="only this server's events")
    p.add_argument("--limit", type=_count, default=50, metavar="N", help="events to show first (default 50, at most 1000)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                   help="how often --follow polls (default 1)")
    p.add_argument("--json", action="store_true", help="JSON (a list; JSON lines with --follow)")
    p.set_defaults(handler=cmd_audit)
