"""``credbroker warm`` and ``credbroker events``.

A bulk warm is paced by a window: at most ``--window`` (user, server) pairs
are queued or running at once, carried in batch tasks of ``--batch`` users of
one server, so the queue in front of interactive resolves never holds more
than a few warm tasks, and each server's concurrency limit applies inside
every batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from typing import Any

from workers.common.outcomes import flight_result
from .common import add_command, check_schema, configure_logging, emit_json, settings, table

__all__ = ["register", "all_user_ids", "BulkWarm"]

# Pairs queued or running at once, and users per batch task (see BulkWarm).
DEFAULT_WINDOW = 128
DEFAULT_BATCH = 32


def all_user_ids(engine: Any) -> list[str]:
    """Every user with a credential or a subject token, sorted."""
    from sqlalchemy import select, union

    from broker.db import credentials, subject_tokens

    stmt = union(select(credentials.c.user_id), select(subject_tokens.c.user_id))
    with engine.connect() as conn:
        return sorted({r[0] for r in conn.execute(stmt)})


class BulkWarm:
    """Warms many users through batch tasks (``broker.warm_batch``: up to
    ``batch_size`` users of one server each, every pair its own flight), with
    at most ``window`` pairs queued or running at once."""

    def __init__(self, rt: Any, client: Any, window: int, deadline_seconds: float,
                 batch_size: int = DEFAULT_BATCH, on_done: Any = None) -> None:
        self.rt = rt
        self.client = client
        self.window = max(window, batch_size)
        self.batch_size = batch_size
        self.deadline_seconds = deadline_seconds
        self.on_done = on_done  # called with the number of pairs each finished batch covered
        self._waiting: dict[str, list[str]] = {}  # server -> users not yet sent
        self.pending: deque[tuple[str, int]] = deque()  # (task id, pairs) in flight
        self.outstanding = 0
        self.sent = 0
        self.joined = 0
        self.tally: Counter[str] = Counter()  # cached, minted, minted_elsewhere, renewed
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    @property
    def queued(self) -> int:
        """Pairs this warm flew (not skipped, not joined to a flight in progress)."""
        return sum(self.tally.values()) + sum(self.failed.values())

    def user(self, user_id: str, servers: list[str] | None) -> None:
        for name in servers if servers is not None else list(self.rt.servers):
            waiting = self._waiting.setdefault(name, [])
            waiting.append(user_id)
            if len(waiting) >= self.batch_size:
                self._send(name)

    def _send(self, server: str) -> None:
        from workers.celery.app import TASK_WARM_BATCH
        from workers.common.flight import new_task_id

        users = self._waiting.pop(server, [])
        if not users:
            return
        while self.pending and self.outstanding + len(users) > self.window:
            self._wait_one()
        task_id = new_task_id()
        self.client.celery.send_task(TASK_WARM_BATCH, args=[server, users], task_id=task_id,
                                     kwargs={"config": self.rt.servers.fingerprint})
        self.pending.append((task_id, len(users)))
        self.outstanding += len(users)
        self.sent += len(users)

    def _wait_one(self) -> None:
        task_id, pairs = self.pending.popleft()
        meta = self.client.waiter.wait(task_id, time.monotonic() + self.deadline_seconds, lambda: True)
        self.outstanding -= pairs
        result = flight_result(meta)
        if meta is None:
            self.failed["timeout"] += pairs
        elif result is None:
            self.failed["error"] += pairs
        elif "error" in result:
            # The whole batch was refused (e.g. config_mismatch, a database outage).
            self.failed[str(result["error"].get("error", "error"))] += pairs
        else:
            self.joined += int(result.get("joined", 0))
            self.tally.update({k: int(result.get(k, 0)) for k in ("cached", "minted", "minted_elsewhere",
                                                                   "renewed")})
            self.skipped.update(result.get("skipped") or {})
            self.failed.update(result.get("failed") or {})
        if self.on_done is not None:
            self.on_done(pairs)

    def finish(self) -> None:
        for server in list(self._waiting):
            self._send(server)
        while self.pending:
            self._wait_one()


def cmd_warm(args: argparse.Namespace) -> int:
    from broker.validation import validate_server_name, validate_user_id

    from .admin import Progress
    from workers.client import BrokerClient
    from workers.common.runtime import build_runtime

    configure_logging()
    s = settings()
    servers = [validate_server_name(n, "SERVER") for n in args.server] if args.server else None
    rt = build_runtime(s)
    try:
        check_schema(rt.store.engine)
        if servers is not None:
            servers = [rt.servers.get_server(n).name for n in servers]
        users = [validate_user_id(args.user, "USER")] if args.user else all_user_ids(rt.store.engine)
        names = servers if servers is not None else list(rt.servers)
        progress = Progress(len(users) * len(names), sys.stderr) if not args.json else None
        with BrokerClient(settings=s, connection=rt.redis, audit=rt.audit) as client:
            bulk = BulkWarm(rt, client, args.window, s.resolve_timeout + 10, batch_size=args.batch,
                            on_done=progress.advance if progress is not None else None)
            started = time.monotonic()
            try:
                for user in users:
                    bulk.user(user, names)
                bulk.finish()
            finally:
                if progress is not None:
                    progress.finish()
            elapsed = time.monotonic() - started
    finally:
        rt.close()
    summary = {"users": len(users), "flights": bulk.queued, "joined": bulk.joined,
               "skipped": dict(bulk.skipped), "failed": dict(bulk.failed), "seconds": round(elapsed, 2),
               "flights_per_second": round(bulk.queued / elapsed, 1) if elapsed > 0 else None}
    if args.json:
        emit_json(summary)
    else:
        print(f"warmed {len(users)} user(s): {bulk.queued} flight(s), {bulk.joined} joined in flight, "
              f"{sum(bulk.skipped.values())} skipped, {sum(bulk.failed.values())} failed "
              f"in {elapsed:.1f}s ({summary['flights_per_second']}/s)")
        for reason, count in sorted(bulk.skipped.items()):
            print(f"  skipped {reason}: {count}")
        for code, count in sorted(bulk.failed.items()):
            print(f"  failed {code}: {count}")
    return 1 if bulk.failed else 0


_EVENT_COLUMNS = ("id", "at", "type", "user_id", "server", "status", "reason")


def cmd_events(args: argparse.Namespace) -> int:
    from broker.db import make_engine
    from broker.events import EventLog
    from broker.servers import servers_from_settings

    configure_logging()
    s = settings()
    engine = make_engine(s.database_url)
    check_schema(engine)
    registry = servers_from_settings(s)

    def name(key: str) -> str | None:
        server = registry.by_key(key)
        return None if server is None else server.name

    log = EventLog(engine, name)
    try:
        events = [e.to_dict() for e in log.after(args.after, args.limit)]
        if args.json and not args.follow:
            emit_json({"events": events, "next": str(events[-1]["id"] if events else args.after)})
            return 0
        if args.json:
            for e in events:
                print(json.dumps(e), flush=True)
        else:
            table([[e[c] for c in _EVENT_COLUMNS] for e in events], [c.upper() for c in _EVENT_COLUMNS])
        if not args.follow:
            return 0
        last = int(events[-1]["id"]) if events else args.after
        while True:
            sys.stdout.flush()
            time.sleep(args.interval)
            for e in (x.to_dict() for x in log.after(last, 1000)):
                print(json.dumps(e) if args.json else "  ".join("-" if e[c] is None else str(e[c])
                                                                   for c in _EVENT_COLUMNS))
                last = int(e["id"])
    except KeyboardInterrupt:
        return 0
    finally:
        engine.dispose()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def register(sub: Any) -> None:
    p = add_command(sub, "warm", "mint or renew users' credentials now (pre-warming)", """
        Warm one user's credentials, or every known user's (a credential or a
        subject token in the store): each (user, server) becomes an ordinary
        flight, so a warm joins a resolve in progress and a fresh credential
        costs no provider call. Servers that cannot be warmed are skipped with
        a reason (never_connected, needs_reconnect, subject_token_missing,
        policy_denied). Users travel in batch tasks of --batch users of one
        server (one task carries many flights); at most --window pairs are
        queued or running at once, and each server's concurrency limit holds
        inside every batch. A progress bar (pairs done) goes to stderr, a
        summary to stdout; exit 1 if a flight failed.
        """, """
        credbroker warm --user alice@example.com
        credbroker warm --all-users --server github
        credbroker warm --all-users --window 128 --json
        """)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="USER", help="warm this user")
    who.add_argument("--all-users", action="store_true", help="warm every user the store knows")
    p.add_argument("--server", action="append", metavar="SERVER", help="only this server (repeatable)")
    p.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW, metavar="N",
                   help=f"(user, server) pairs queued or running at once (default {DEFAULT_WINDOW}); about "
                        "twice a server's concurrency limit keeps it busy")
    p.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH, metavar="N",
                   help=f"users of one server per task (default {DEFAULT_BATCH}); 1 sends a task per pair")
    p.add_argument("--json", action="store_true", help="print the summary as JSON, no progress bar")
    p.set_defaults(handler=cmd_warm)

    p = add_command(sub, "events", "connection lifecycle events, oldest first", """
        Show connection events (connected, degraded, recovered,
        needs_reconnect, disconnected, expired) from the database, oldest
        first; --follow keeps printing new ones. Events never hold a secret.
        """, """
        credbroker events
        credbroker events --after 1200 --limit 50 --json
        credbroker events --follow
        """)
    p.add_argument("--after", type=int, default=0, metavar="CURSOR", help="only events after this id")
    p.add_argument("--limit", type=_positive_int, default=100, metavar="N", help="events per page (default 100)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="--follow poll interval")
    p.add_argument("--json", action="store_true", help="JSON (one object per line with --follow)")
    p.set_defaults(handler=cmd_events)
