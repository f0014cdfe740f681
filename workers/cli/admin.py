"""Operator commands: ``keygen``, ``rotate-keys``, ``db``, ``servers``."""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from typing import IO, Any

from broker.errors import ServiceUnavailable
from broker.registrations import RegistrationStore, registered_clients

from .common import UsageError, add_command, configure_logging, emit_json, open_store, settings, table

__all__ = ["register", "Progress"]


# -- keygen ------------------------------------------------------------------------


def cmd_keygen_jwk(args: argparse.Namespace) -> int:
    """A private_key_jwt key pair: the PEM private key, and the public JWK to register."""
    import json

    from broker.jose import SigningKey, generate_private_key, private_pem

    if args.transport:
        raise UsageError("--jwk and --transport are different keys; give one")
    if args.kid is not None and (not args.kid or not args.kid.isprintable()):
        raise UsageError("--kid must be printable text")
    key = SigningKey.of(generate_private_key(args.alg), kid=args.kid)
    pem = private_pem(key.key)
    if args.out:
        try:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot create {args.out!r}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as out:
            out.write(pem)
    else:
        sys.stdout.write(pem)
    print(json.dumps({"keys": [key.public_jwk()]}, indent=2))
    if sys.stderr.isatty():
        where = f"the private key is in {args.out} (mode 600)" if args.out else "keep the PEM block private"
        print(f"# register the JWK (\"keys\") with the authorization server as this client's key; {where}; "
              f"set auth_broker.client_auth: private_key_jwt, client_assertion_key_file (or _env) and "
              f"client_assertion_kid: {key.kid}", file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from broker.crypto import generate_key_line

    if args.jwk:
        return cmd_keygen_jwk(args)
    if args.alg != "ES256" or args.out:
        raise UsageError("--alg and --out apply to --jwk")
    if args.transport and args.kid:
        raise UsageError("--kid applies to master keys; a transport key has no key id")
    if args.transport:
        print(base64.b64encode(os.urandom(32)).decode())
    else:
        print(generate_key_line(args.kid))
    if sys.stderr.isatty():
        hint = ("set it as CREDBROKER_TRANSPORT_KEY on the workers and every client" if args.transport else
                "put it FIRST in CREDBROKER_MASTER_KEYS (keep the old keys after it), restart, then run "
                "`credbroker rotate-keys`")
        print(f"# {hint}", file=sys.stderr)
    return 0


# -- rotate-keys ----------------------------------------------------------------------


class Progress:
    """A text progress bar: done/total, percent and rate.

    On a terminal it redraws one line; otherwise (a log, a pipe) it prints one
    line per batch, so the progress is still readable afterwards.
    """

    def __init__(self, total: int, out: IO[str], width: int = 30, clock: Any = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.width = width
        self.clock = clock
        self.started = clock()
        self.tty = out.isatty()

    def line(self) -> str:
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(round(fraction * self.width))
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{fraction * 100:5.1f}% {rate:,.0f} records/s")

    def advance(self, n: int) -> None:
        self.done += n
        if self.tty:
            self.out.write("\r" + self.line())
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self.done:
            self.out.write("\n")
            self.out.flush()


def _records_by_key(store: Any) -> dict[str, int]:
    """Record counts per key id, every sealed table together (for --dry-run)."""
    from sqlalchemy import func, select

    from broker.db import credentials, subject_tokens

    counts: dict[str, int] = {}
    with store.engine.connect() as conn:
        for t in (credentials, subject_tokens):
            for kid, n in conn.execute(select(t.c.key_id, func.count()).group_by(t.c.key_id)):
                counts[kid] = counts.get(kid, 0) + int(n)
        ready = registered_clients.c.status == "ready"
        for kid, n in conn.execute(select(registered_clients.c.key_id, func.count()).where(ready)
                                   .group_by(registered_clients.c.key_id)):
            counts[kid] = counts.get(kid, 0) + int(n)
    return counts


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    configure_logging()
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    store = open_store(settings())
    clients = RegistrationStore(store.engine, store.keyring)
    try:
        total = store.count_stale_keys() + clients.count_stale_keys()  # StoreDisabled without a master key
        active = store.keyring.active_kid
        if args.dry_run:
            by_key = _records_by_key(store)
            if args.json:
                emit_json({"active_key": active, "to_rewrite": total, "records_by_key": by_key})
            else:
                print(f"active key {active!r}; {total} record(s) would be re-encrypted to it")
                table(sorted((k, n, "active" if k == active else "old") for k, n in by_key.items()),
                      ["KEY", "RECORDS", "ROLE"])
            return 0
        if total == 0:
            if args.json:
                emit_json({"active_key": active, "rewritten": 0, "already_current": 0, "unreadable": 0,
                           "skipped_concurrent": 0, "left": 0})
            else:
                print(f"nothing to do: every record is under the active key {active!r}")
            return 0
        progress = Progress(total, sys.stderr)
        try:
            report = store.reencrypt(batch_size=args.batch_size, on_batch=progress.advance)
            # Dynamically registered clients (MCP discovery) ride the same keyring.
            rewritten, unreadable = clients.reencrypt()
            report.rewritten += rewritten
            report.unreadable += unreadable
            if rewritten + unreadable:
                progress.advance(rewritten + unreadable)
        except KeyboardInterrupt:
            progress.finish()
            print(f"interrupted after {progress.done} record(s); run `credbroker rotate-keys` again to continue",
                  file=sys.stderr)
            return 130
        progress.finish()
        left = store.count_stale_keys() + clients.count_stale_keys()
    finally:
        store.engine.dispose()
    summary = {"active_key": active, "rewritten": report.rewritten, "already_current": report.already_current,
               "unreadable": report.unreadable, "skipped_concurrent": report.skipped_concurrent, "left": left}
    if args.json:
        emit_json(summary)
    else:
        print(f"re-encrypted to key {active!r}: {report.rewritten} rewritten, {report.unreadable} unreadable, "
              f"{report.skipped_concurrent} skipped (changed concurrently, already rewritten by their writer)")
        if left == 0:
            print("0 records left under old keys: the old keys can now be removed from CREDBROKER_MASTER_KEYS")
        else:
            why = (f"{report.unreadable} could not be decrypted with any configured key (see the log); "
                   if report.unreadable else "")
            print(f"{left} record(s) still under old keys: {why}run `credbroker rotate-keys` again before "
                  "removing any key")
    return 0 if left == 0 else 1


# -- db -------------------------------------------------------------------------------


def _engine() -> Any:
    from broker.db import make_engine

    return make_engine(settings().database_url)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from broker.migrate import HEAD, current_revision, upgrade

    configure_logging()
    engine = _engine()
    try:
        before = current_revision(engine)
        upgrade(engine)
        after = current_revision(engine)
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"database unavailable ({type(exc).__name__})") from None
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    if args.json:
        emit_json({"database": where, "before": before, "current": after, "head": HEAD})
    elif before == after:
        print(f"{where}: already at revision {after} (head)")
    else:
        print(f"{where}: upgraded from {before or 'empty'} to revision {after} (head)")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from broker.migrate import HEAD, current_revision

    engine = _engine()
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"database unavailable ({type(exc).__name__})") from None
    finally:
        engine.dispose()
    if args.json:
        emit_json({"current": current, "head": HEAD, "up_to_date": current == HEAD})
    elif current is None:
        print("no schema yet: run `credbroker db upgrade`")
    else:
        behind = f" (head is {HEAD}: run `credbroker db upgrade`)"
        print(f"revision {current}" + (" (head)" if current == HEAD else behind))
    return 0 if current == HEAD else 1


# -- servers ------------------------------------------------------------------------------


def cmd_servers_check(args: argparse.Namespace) -> int:
    from broker.errors import ConfigError
    from broker.servers import check_servers, read_servers_file

    where = f"servers file {str(args.file)!r}"
    try:
        servers, errors = check_servers(read_servers_file(args.file))
    except ConfigError as exc:  # unreadable, or not a servers file at all
        raise ConfigError(exc.message if exc.message.startswith(where) else f"{where}: {exc.message}") from None
    # Every error at once (each names the server and the field), not just the first.
    for error in errors:
        print(f"error: {error.code}: {where}: {error.message}", file=sys.stderr)
    if errors:
        print(f"{args.file}: {len(errors)} error(s); {len(servers)} server(s) valid", file=sys.stderr)
        return 2
    if not servers:
        print(f"error: config_error: {where}: no servers (an empty file configures nothing; in an mcpServers "
              "file only servers with an auth_broker block count)", file=sys.stderr)
        return 2
    if args.json:
        emit_json([{"name": s.name, "mode": s.mode.value, "key": s.key, "url": s.url} for s in servers])
        return 0
    table([(s.name, s.mode.value, s.key[:12], s.url) for s in servers], ["NAME", "MODE", "KEY", "URL"])
    print(f"{args.file}: {len(servers)} server(s), OK")
    return 0


def cmd_servers_status(args: argparse.Namespace) -> int:
    """Each configured server's circuit breaker and in-flight calls, cluster-wide."""
    import redis

    from broker.servers import servers_from_settings

    from workers.common.upstream_guard import GuardLimits, ServerGuard

    s = settings()
    registry = servers_from_settings(s)
    client = redis.Redis.from_url(s.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        guard = ServerGuard(client, GuardLimits.from_settings(s))
        rows = [(registry[name], guard.status(registry[name].key)) for name in registry]
    finally:
        client.close()
    if args.json:
        emit_json([{"name": srv.name, "circuit": st.state, "consecutive_failures": st.failures,
                    "open_seconds_left": round(st.open_seconds_left, 1), "times_opened": st.opened_total,
                    "in_flight": st.in_flight, "limit": st.limit} for srv, st in rows])
        return 0
    table([(srv.name, st.state, st.failures, f"{st.open_seconds_left:.0f}s" if st.state == "open" else "-",
            st.opened_total, f"{st.in_flight}/{st.limit}") for srv, st in rows],
          ["NAME", "CIRCUIT", "FAILURES", "REOPENS IN", "OPENED", "IN FLIGHT"])
    return 0


def cmd_servers_discover(args: argparse.Namespace) -> int:
    """Follow a server URL to its authorization server and print what was found (no secret, no registration)."""
    from broker.oauth.client import OAuthClient
    from broker.oauth.sender import TokenEndpointSender, make_http_client
    from broker.server_config import check_url
    from broker.settings import load_settings

    check_url(args.url, "servers discover", "URL", https=True)
    settings = load_settings()
    with make_http_client(settings) as http:
        found = OAuthClient(TokenEndpointSender.from_settings(settings, http)).discover(args.url)
    if args.json:
        emit_json(found.to_dict())
        return 0
    identify = ("client ID metadata document (needs an https PUBLIC_URL), else dynamic registration"
                if found.client_id_metadata_document_supported
                else "dynamic registration" if found.registration_endpoint else "none (no registration endpoint)")
    table([
        ("resource", found.resource),
        ("resource metadata", found.resource_metadata_url),
        ("authorization server", found.issuer),
        ("authorization_endpoint", found.authorization_endpoint),
        ("token_endpoint", found.token_endpoint),
        ("registration_endpoint", found.registration_endpoint or "-"),
        ("revocation_endpoint", found.revocation_endpoint or "-"),
        ("PKCE", " ".join(found.code_challenge_methods)),
        ("scopes", " ".join(found.scopes_supported) or "-"),
        ("client identification", identify),
    ], ["FIELD", "VALUE"])
    print(f"add it with:\n  - name: NAME\n    url: {found.resource}\n    discover: mcp")
    return 0


# -- registration -----------------------------------------------------------------------------


def register(sub: Any) -> None:
    p = add_command(sub, "keygen", "print a new master key (or transport key)", """
        Print a fresh random 256-bit key: a `kid:base64` entry for
        CREDBROKER_MASTER_KEYS, or with --transport a bare base64 key for
        CREDBROKER_TRANSPORT_KEY. Nothing is stored anywhere.
        """, """
        credbroker keygen                      # k1a2b3c4d:base64...
        credbroker keygen --kid 2025-06        # 2025-06:base64...
        credbroker keygen --transport          # base64...
        credbroker keygen --jwk --out client.pem   # private_key_jwt: PEM to a file, public JWK printed
        credbroker keygen --jwk --alg RS256        # PEM private key, then {"keys": [public JWK]}
        """)
    p.add_argument("--kid", metavar="K", help="key id (1-32 of A-Z a-z 0-9 . _ -; default: random; "
                                              "with --jwk: the JWK kid, default its RFC 7638 thumbprint)")
    p.add_argument("--transport", action="store_true", help="print a transport key instead of a master key entry")
    p.add_argument("--jwk", action="store_true",
                   help="a private_key_jwt key pair: PEM private key and the public JWK to register")
    p.add_argument("--alg", choices=("ES256", "RS256"), default="ES256", help="with --jwk (default ES256)")
    p.add_argument("--out", metavar="FILE", help="with --jwk: write the PEM private key to FILE (mode 600)")
    p.set_defaults(handler=cmd_keygen)

    p = add_command(sub, "rotate-keys", "re-encrypt every record to the active (first) master key", """
        Re-encrypt every stored credential and subject token that is not yet
        under the active key (the first in CREDBROKER_MASTER_KEYS), in
        batches, while the broker keeps running. A progress bar goes to
        stderr. It is resumable: an interrupted run continues where it
        stopped when run again. Drop an old key only once this reports
        0 records left. Exit status 1 when records remain under old keys.
        """, """
        credbroker rotate-keys --dry-run       # how many records, under which keys
        credbroker rotate-keys                 # rewrite them, 500 per batch
        credbroker rotate-keys --batch-size 100 --json
        """)
    p.add_argument("--batch-size", type=int, default=500, metavar="N", help="records per transaction (default 500)")
    p.add_argument("--dry-run", action="store_true", help="only count the records per key")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_rotate_keys)

    db = add_command(sub, "db", "database schema: upgrade, current", """
        Manage the database schema (SQLite or PostgreSQL, from
        CREDBROKER_DATABASE_URL). Run `db upgrade` once per release;
        `credbroker up` runs it for you.
        """, """
        credbroker db upgrade
        credbroker db current --json
        """)
    dbsub = db.add_subparsers(dest="db_command", metavar="{upgrade,current}", required=True)
    p = add_command(dbsub, "upgrade", "create or migrate the schema to the latest revision", """
        Create the tables, or migrate them to the latest revision. Safe to run
        on every start and from several hosts.
        """, "credbroker db upgrade\nCREDBROKER_DATABASE_URL=postgresql://broker@db/broker credbroker db upgrade")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_db_upgrade)
    p = add_command(dbsub, "current", "show the schema revision", """
        Print the schema revision of the database. Exit status 1 when it is
        not the latest (run `credbroker db upgrade`).
        """, "credbroker db current")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_db_current)

    servers = add_command(sub, "servers", "server config and health: check a servers file, circuit status", """
        Work with the servers file (CREDBROKER_SERVERS_FILE: YAML, JSON, or
        mcpproxy-style `mcpServers` JSON).
        """, "credbroker servers check servers.yaml")
    ssub = servers.add_subparsers(dest="servers_command", metavar="{check,discover,status}", required=True)
    p = add_command(ssub, "check", "validate a servers file", """
        Load and validate a servers file exactly as the broker would, and list
        each server's name, mode, key (short) and URL. Exit status 2 with the
        reason on an invalid file.
        """, """
        credbroker servers check servers.yaml
        credbroker servers check ~/.mcpproxy/mcp_config.json --json
        """)
    p.add_argument("file", metavar="FILE", help="the servers file to check")
    p.add_argument("--json", action="store_true", help="print the servers as JSON (full keys)")
    p.set_defaults(handler=cmd_servers_check)
    p = add_command(ssub, "discover", "follow an MCP server URL to its authorization server", """
        Probe the URL unauthenticated and follow its WWW-Authenticate /
        RFC 9728 protected resource metadata to the authorization server's
        RFC 8414 metadata; print what was found. Registers nothing, prints
        no secret. Exit status 1 with the reason when discovery fails.
        """, "credbroker servers discover https://mcp.example.com/mcp")
    p.add_argument("url", metavar="URL", help="the MCP server URL")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_servers_discover)

    p = add_command(ssub, "status", "circuit breaker and in-flight calls per server", """
        Show each configured server's circuit breaker (closed, open with the
        time until its next probe, or half_open while one probe call runs),
        its consecutive transient failures across users, how often it opened,
        and its calls in flight against the per-server limit
        (CREDBROKER_SERVER_MAX_CONCURRENCY). Read from Redis: cluster-wide.
        """, """
        credbroker servers status
        credbroker servers status --json
        """)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_servers_status)
