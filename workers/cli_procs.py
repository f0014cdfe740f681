"""Process commands: ``api``, ``worker``, ``beat``, ``flower``.

``worker``, ``beat`` and ``flower`` replace this process with the Celery
command (exec), so signals reach Celery directly and a process supervisor
sees one process. The settings are validated first, so a bad setting reads
as ``error: config_error: ...`` and not as a Celery traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from broker.errors import ConfigError
from broker.settings import Settings

from .cli_common import add_command, configure_logging, environment, port_number, positive_int, settings

__all__ = ["register", "celery_argv", "worker_argv", "beat_argv", "flower_command", "POOLS"]

POOLS = ("prefork", "threads", "solo")
# Flights wait on the provider, not the CPU: a thread pool sized for waiting
# (about target flights/s x provider latency, with headroom) is the default.
# The database, Redis and HTTP pools of a worker process are sized to match
# (broker.db.make_engine, workers.runtime, broker.oauth.sender).
DEFAULT_POOL = "threads"
DEFAULT_THREADS = 64
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The broker's queues (workers.celery_app.QUEUES), without importing Celery here:
# interactive resolves first, then the beat's refreshes.
QUEUES = ("credbroker", "credbroker.refresh")
QUEUE_CHOICES = {"resolve": QUEUES[0], "refresh": QUEUES[1]}


def celery_argv(command: str, *options: str, quiet: bool = False) -> list[str]:
    """``celery -A workers.celery_app COMMAND``; ``quiet`` drops Celery's start-up banner."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", *(["--quiet"] if quiet else []),
            command, *options]


def _exec(argv: list[str], env: Mapping[str, str] | None = None) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, dict(environment() if env is None else env))


# -- api ------------------------------------------------------------------------------------


def cmd_api(args: argparse.Namespace) -> int:
    s = settings()
    configure_logging(s.log_level)
    from .api import serve_api  # lazily: Starlette and uvicorn only for this command

    serve_api(s, args.host, args.port)
    return 0


# -- worker -----------------------------------------------------------------------------------


def _queues(args: argparse.Namespace) -> list[str]:
    names = getattr(args, "queues", None) or ["resolve", "refresh"]
    return [QUEUE_CHOICES[n] for n in QUEUE_CHOICES if n in names]


def _queue_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in QUEUE_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of: resolve, refresh")
    return names


def worker_argv(args: argparse.Namespace, s: Settings) -> list[str]:
    argv = celery_argv("worker", f"--loglevel={args.loglevel or s.log_level}", f"--pool={args.pool}",
                       f"--queues={','.join(_queues(args))}", f"--hostname={args.hostname}",
                       # No broadcast chatter between workers: nothing here uses it.
                       "--without-gossip", "--without-mingle", quiet=getattr(args, "quiet", False))
    concurrency = args.concurrency or (DEFAULT_THREADS if args.pool == "threads" else None)
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    _exec(worker_argv(args, settings()))


# -- beat ---------------------------------------------------------------------------------------


def beat_argv(args: argparse.Namespace, s: Settings) -> list[str]:
    schedule = Path(args.schedule) if args.schedule else s.state_dir / "celerybeat-schedule"
    return celery_argv("beat", f"--loglevel={args.loglevel or s.log_level}", f"--schedule={schedule}",
                       quiet=getattr(args, "quiet", False))


def cmd_beat(args: argparse.Namespace) -> int:
    from .embedded import ensure_state_dir

    s = settings()
    argv = beat_argv(args, s)
    schedule = Path(argv[-1].split("=", 1)[1])
    ensure_state_dir(schedule.parent)
    # The schedule files live in the owner-only state folder: make them owner-only
    # too (beat's shelve creates them with the umask; exec keeps the umask).
    os.umask(os.umask(0o077) | 0o077)
    for old in schedule.parent.glob(schedule.name + "*"):
        if old.is_file() and old.stat().st_mode & 0o077:
            old.chmod(0o600)
    _exec(argv)


# -- flower ---------------------------------------------------------------------------------------


def flower_command(args: argparse.Namespace, s: Settings,
                   environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """Flower's argv and environment. The credentials go in FLOWER_BASIC_AUTH (Flower
    reads its options from FLOWER_* variables), never on the command line, where
    every local user could read them in the process list."""
    env = dict(environ)
    if s.flower_basic_auth is not None:
        env["FLOWER_BASIC_AUTH"] = s.flower_basic_auth.reveal()
    elif not args.insecure_no_auth:
        raise ConfigError("Flower needs authentication: set CREDBROKER_FLOWER_BASIC_AUTH=user:password "
                          "(or pass --insecure-no-auth, for a trusted network only)")
    argv = celery_argv("flower", f"--port={args.port}", f"--address={args.address}")
    return argv, env


def cmd_flower(args: argparse.Namespace) -> int:
    s = settings()
    argv, env = flower_command(args, s, environment())
    if s.flower_basic_auth is None:
        print("WARNING: Flower is starting WITHOUT authentication (--insecure-no-auth)", file=sys.stderr)
    _exec(argv, env)


# -- registration --------------------------------------------------------------------------------------


def _level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return text.upper()


def register(sub: Any) -> None:
    p = add_command(sub, "api", "serve the HTTP API", """
        Serve the HTTP API (resolve, connect and its browser callback,
        credentials, audit, health and metrics) with uvicorn. Configured by
        the CREDBROKER_* settings; the connect callback URL is
        CREDBROKER_PUBLIC_URL + /v1/connect/callback.
        """, """
        credbroker api                          # 127.0.0.1:8080
        credbroker api --host 0.0.0.0 --port 8080
        """)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8080, help="port to listen on (default 8080)")
    p.set_defaults(handler=cmd_api)

    p = add_command(sub, "worker", "run a Celery worker (one process tree)", """
        Run one Celery worker process tree that executes resolve and refresh
        flights and moves audit events to the database. Run as many as you
        need, on as many hosts: single-flight is cluster-wide. By default it
        consumes both queues, interactive resolves before beat refreshes;
        --queues refresh makes a dedicated refresh worker, --queues resolve
        one that never takes a refresh (the beat's scan and audit moves run
        on the resolve queue).
        """, """
        credbroker worker
        credbroker worker --concurrency 8
        credbroker worker --concurrency 128 --loglevel debug
        credbroker worker --pool prefork --concurrency 4
        credbroker worker --queues refresh --concurrency 16   # a dedicated refresh worker
        """)
    p.add_argument("--concurrency", "-c", type=positive_int, metavar="N",
                   help=f"pool threads or processes (default {DEFAULT_THREADS} threads; prefork: number of CPUs)")
    p.add_argument("--pool", "-P", choices=POOLS, default=DEFAULT_POOL,
                   help=f"execution pool (default {DEFAULT_POOL}: flights are I/O-bound)")
    p.add_argument("--loglevel", "-l", type=_level, metavar="LEVEL", help="default CREDBROKER_LOG_LEVEL")
    p.add_argument("--queues", "-Q", type=_queue_list, metavar="LIST",
                   help="queues to consume: resolve, refresh or both (default resolve,refresh; resolves are "
                        "always taken first)")
    p.add_argument("--hostname", "-n", default="credbroker@%h", metavar="NAME",
                   help="node name (default credbroker@%%h, %%h = host name)")
    p.add_argument("--quiet", "-q", action="store_true", help="no start-up banner")
    p.set_defaults(handler=cmd_worker)

    p = add_command(sub, "beat", "run the scheduler (proactive refresh, audit flush)", """
        Run Celery beat: every CREDBROKER_REFRESH_SCAN_SECONDS it starts the
        refresh of credentials near expiry that were used recently, and every
        second it moves audit events to the database. Run one per cluster
        (two by mistake do not double the work).
        """, "credbroker beat\ncredbroker beat --schedule /var/lib/credbroker/beat-schedule")
    p.add_argument("--schedule", "-s", metavar="PATH",
                   help="beat's schedule file (default CREDBROKER_STATE_DIR/celerybeat-schedule)")
    p.add_argument("--loglevel", "-l", type=_level, metavar="LEVEL", help="default CREDBROKER_LOG_LEVEL")
    p.add_argument("--quiet", "-q", action="store_true", help="no start-up banner")
    p.set_defaults(handler=cmd_beat)

    p = add_command(sub, "flower", "run Flower, the task monitor (authentication required)", """
        Run Flower to watch tasks and workers. It requires HTTP basic
        authentication from CREDBROKER_FLOWER_BASIC_AUTH (user:password) and
        refuses to start without it unless --insecure-no-auth is given. Task
        arguments are a user id and a server name; results are sealed, so
        Flower shows no secret.
        """, """
        CREDBROKER_FLOWER_BASIC_AUTH=ops:s3cret credbroker flower
        credbroker flower --address 0.0.0.0 --port 5555
        """)
    p.add_argument("--port", type=port_number, default=5555, help="port to listen on (default 5555)")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--insecure-no-auth", action="store_true", help="start without authentication (not advised)")
    p.set_defaults(handler=cmd_flower)
