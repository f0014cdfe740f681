"""``credbroker warm`` and ``credbroker events``.

A bulk warm is paced by a window: at most ``--window`` warm flights are
queued or running at once, so the queue in front of interactive resolves
never holds more than that many warms, and the per-server limits of the
workers still apply inside each flight.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from typing import Any

from .outcomes import flight_result
from .cli_common import add_command, check_schema, configure_logging, emit_json, settings, table

__all__ = ["register", "all_user_ids", "BulkWarm"]

DEFAULT_WINDOW = 64


def all_user_ids(engine: Any) -> list[str]:
    """Every user with a credential or a subject token, sorted."""
    from sqlalchemy import select, union

    from broker.db import credentials, subject_tokens

    stmt = union(select(credentials.c.user_id), select(subject_tokens.c.user_id))
    with engine.connect() as conn:
        return sorted({r[0] for r in conn.execute(stmt)})


class BulkWarm:
    """Warms many users through a window of outstanding flights."""

    def __init__(self, rt: Any, client: Any, window: int, deadline_seconds: float) -> None:
        self.rt = rt
        self.client = client
        self.window = window
        self.deadline_seconds = deadline_seconds
        self.pending: deque[str] = deque()
        self.queued = 0
        self.joined = 0
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.done = 0

    def _send(self, name: str, args: list[Any], task_id: str) -> None:
        self.client.celery.send_task(name, args=args, task_id=task_id)

    def _wait_one(self) -> None:
        task_id = self.pending.popleft()
        meta = self.client.waiter.wait(task_id, time.monotonic() + self.deadline_seconds, lambda: True)
        self.done += 1
        result = flight_result(meta)
        if meta is None:
            self.failed["timeout"] += 1
        elif result is None:
            self.failed["error"] += 1
        elif "error" in result:
            self.failed[str(result["error"].get("error", "error"))] += 1

    def user(self, user_id: str, servers: list[str] | None) -> None:
        from .celery_app import TASK_WARM
        from .warm import warm_user

        plan, started = warm_user(self.rt, user_id, servers, self._send, TASK_WARM)
        self.queued += len(started)
        self.joined += len(plan.fly) - len(started)
        self.skipped.update(s["reason"] for s in plan.skipped)
        self.pending.extend(started)
        while len(self.pending) > self.window:
            self._wait_one()

    def finish(self) -> None:
        while self.pending:
            self._wait_one()


def cmd_warm(args: argparse.Namespace) -> int:
    from broker.validation import validate_server_name, validate_user_id

    from .cli_admin import Progress
    from .client import BrokerClient
    from .runtime import build_runtime

    configure_logging()
    s = settings()
    servers = [validate_server_name(n, "SERVER") for n in args.server] if args.server else None
    rt = build_runtime(s)
    try:
        check_schema(rt.store.engine)
        if servers is not None:
            servers = [rt.servers.get_server(n).name for n in servers]
        users = [validate_user_id(args.user, "USER")] if args.user else all_user_ids(rt.store.engine)
        with BrokerClient(settings=s, connection=rt.redis, audit=rt.audit) as client:
            bulk = BulkWarm(rt, client, args.window, s.resolve_timeout + 10)
            progress = Progress(len(users), sys.stderr) if not args.json else None
            started = time.monotonic()
            try:
                for n, user in enumerate(users, 1):
                    bulk.user(user, servers)
                    if progress is not None and (n % 100 == 0 or n == len(users)):
                        progress.advance(n - progress.done)
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
        policy_denied). A progress bar goes to stderr, a summary to stdout;
        exit 1 if a flight failed.
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
                   help=f"warm flights queued or running at once (default {DEFAULT_WINDOW}); keep it below "
                        "the cluster's worker slots so interactive resolves always find one")
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
