"""``credbroker up``: API, worker, beat (and Flower, and the demo) as one process tree.

Order: fill the gaps in the configuration (``embedded``), start the sandbox
for ``--demo``, upgrade the database, start the children, wait for the API's
``/healthz``, then watch. Ctrl-C or SIGTERM stops everything (exit 0); a
child that dies on its own stops everything too (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Any

import httpx

from broker.settings import PREFIX, load_settings

from .cli_common import UsageError, add_command, port_number, positive_int
from .cli_supervisor import ChildDied, Stopped, Supervisor

__all__ = ["register", "cmd_up"]

log = logging.getLogger("credbroker.up")

STARTUP_TIMEOUT = 90.0  # a cold start imports Celery, SQLAlchemy and Starlette in four processes


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _local(host: str) -> str:
    """The address to reach a server bound to ``host`` from this machine."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse, before anything starts, a port another program already listens on.

    Otherwise the API child dies right after start-up, or worse, another
    server answers our health check and ``up`` claims to be up.
    """
    if _bind_error(host, port) is None:
        return
    free = next((p for p in range(port + 1, min(port + 50, 65536)) if _bind_error(host, p) is None), None)
    hint = f"; choose another with {flag}" + (f", e.g. {flag} {free}" if free else "")
    raise UsageError(f"port {port} on {host} is already in use (another program, or another credbroker up, "
                     f"listens there){hint}")


def _bind_error(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn does: a port held only by connections in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _wait_for_worker(sup: Supervisor, settings: Any) -> None:
    from .celery_app import make_celery

    app = make_celery(settings)
    try:
        sup.wait_for(lambda: bool(app.control.ping(timeout=0.5)), STARTUP_TIMEOUT, "a worker to answer a ping")
    finally:
        app.close()


def _prepare_demo(sup: Supervisor, env: dict[str, str], values: dict[str, str],
                  folder: Any) -> tuple[str, str | None, dict[str, str]]:
    """Start the sandbox; return its URL, the demo API key (if made here) and the settings to add."""
    from .demo import demo_api_key, write_servers_file

    sandbox = sup.spawn("sandbox", [sys.executable, "-m", "broker.sandbox", "--host", "127.0.0.1", "--port", "0"],
                        env, infra=True)
    url = sup.wait_for(lambda: next((ln.strip() for ln in sandbox.lines if ln.startswith("http")), None), 30,
                       "the sandbox provider to start")
    added = {PREFIX + "SERVERS_FILE": str(write_servers_file(folder, url).resolve())}
    if values.get(PREFIX + "SERVERS_FILE"):
        log.warning("--demo: using the demo servers file instead of CREDBROKER_SERVERS_FILE")
    key = None
    if not values.get(PREFIX + "API_KEYS"):
        key = demo_api_key(folder)
        added[PREFIX + "API_KEYS"] = key
    return url, key, added


def _seed_demo(settings: Any, engine: Any, sandbox_url: str) -> None:
    from broker.servers import servers_from_settings
    from broker.store import CredentialStore

    from .demo import DEMO_SERVERS, forget_demo_user, seed_subject_token
    from .runtime import redis_client

    store = CredentialStore(engine, settings.keyring)
    servers = servers_from_settings(settings)
    client = redis_client(settings)
    try:
        forget_demo_user(store, client, [servers[n].key for n in DEMO_SERVERS])
        seed_subject_token(store, sandbox_url)
    finally:
        client.close()


def cmd_up(args: argparse.Namespace) -> int:
    from broker.db import make_engine
    from broker.migrate import upgrade

    from . import embedded

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    values = embedded.configured()
    running = embedded.read_session(values)
    if running is not None:
        raise UsageError(f"credbroker up is already running in this folder (pid {running[0]}); "
                         "stop it first, or set CREDBROKER_STATE_DIR to run another")
    # Before anything starts: a malformed setting names its variable, a taken port says so.
    load_settings(values, env_file=None)
    check_port_free(args.host, args.port)
    if args.flower:
        check_port_free("127.0.0.1", args.flower_port, "--flower-port")
    sup = Supervisor(out=sys.stdout)
    sup.install_signal_handlers()
    prepared: embedded.Embedded | None = None
    code = 0
    try:
        prepared = embedded.prepare(values)
        if prepared.redis is not None:
            sup.adopt("redis", prepared.redis.process, infra=True)
        folder = prepared.folder
        overrides = dict(prepared.env)
        api_url = f"http://{_local(args.host)}:{args.port}"
        if not values.get(PREFIX + "PUBLIC_URL"):
            overrides[PREFIX + "PUBLIC_URL"] = api_url
        env = {**os.environ, **overrides, "PYTHONUNBUFFERED": "1"}
        sandbox_url, demo_key = None, None
        if args.demo:
            sandbox_url, demo_key, added = _prepare_demo(sup, env, values, folder)
            overrides.update(added)
        if args.flower and not values.get(PREFIX + "FLOWER_BASIC_AUTH"):
            import secrets

            auth, _ = embedded.secret_file(folder / "flower-basic-auth", lambda: "admin:" + secrets.token_urlsafe(18))
            overrides[PREFIX + "FLOWER_BASIC_AUTH"] = auth
        if not values.get(PREFIX + "WORKER_SLOTS"):
            # One worker of --workers threads: the per-server limit and the scan budget size from it.
            from .cli_procs import DEFAULT_THREADS

            overrides[PREFIX + "WORKER_SLOTS"] = str(args.workers or DEFAULT_THREADS)
        env = {**os.environ, **overrides, "PYTHONUNBUFFERED": "1"}
        settings = load_settings(env)

        engine = make_engine(settings.database_url)
        try:
            upgrade(engine)
            log.info("database schema up to date (%s)", engine.url.render_as_string(hide_password=True))
            if sandbox_url is not None:
                _seed_demo(settings, engine, sandbox_url)
        finally:
            engine.dispose()

        cli = [sys.executable, "-m", "workers.cli"]
        # Celery logs two lines per task at INFO, and beat sends one every second:
        # unless a level is configured, workers and beat report warnings only.
        quiet = [] if values.get(PREFIX + "LOG_LEVEL") else ["--loglevel", "WARNING"]
        # No Celery banners: 35 lines that would scroll the demo's instructions away.
        quiet.append("--quiet")
        sup.spawn("api", [*cli, "api", "--host", args.host, "--port", str(args.port)], env)
        threads = ["--concurrency", str(args.workers)] if args.workers else []
        sup.spawn("worker", [*cli, "worker", *threads, *quiet], env)
        sup.spawn("beat", [*cli, "beat", *quiet], env)
        if args.flower:
            sup.spawn("flower", [*cli, "flower", "--port", str(args.flower_port)], env)
        # Everything the children got, so a shell or BrokerClient() beside us reaches the same cluster.
        embedded.write_session(folder, {**values, **overrides})
        sup.wait_for(lambda: _healthy(api_url + "/healthz"), STARTUP_TIMEOUT, "the API to answer /healthz")
        # Up means a worker takes tasks: the first resolve is served, and the worker's own
        # start-up lines come before the instructions, not after them.
        _wait_for_worker(sup, settings)

        lines = [f"credbroker is up: API {api_url} (state in {folder.resolve()}/). Ctrl-C stops everything.",
                 "other credbroker commands and BrokerClient() run in this folder use the same settings "
                 f"while it runs ({folder / embedded.SESSION_FILE})"]
        if not values.get(PREFIX + "LOG_LEVEL"):
            lines.append("worker and beat log warnings only; set CREDBROKER_LOG_LEVEL=INFO to see every task")
        if args.flower:
            where = ("password in " + str(folder / "flower-basic-auth")) if not values.get(
                PREFIX + "FLOWER_BASIC_AUTH") else "CREDBROKER_FLOWER_BASIC_AUTH"
            lines.append(f"Flower: http://127.0.0.1:{args.flower_port} (basic auth: {where})")
        if sandbox_url is not None:
            from .demo import instructions

            lines.append(instructions(api_url, sandbox_url, demo_key, (folder / embedded.SESSION_FILE).resolve()))
        sup.say("credbroker", "\n".join(lines))
        sup.run()
    except Stopped as stop:
        sup.say("credbroker", f"{stop}: stopping everything")
    except ChildDied as died:
        sup.say("credbroker", f"error: {died}: stopping everything")
        code = 1
    except TimeoutError as exc:
        sup.say("credbroker", f"error: {exc}: stopping everything")
        code = 1
    finally:
        sup.stop()
        if prepared is not None:
            embedded.remove_session(prepared.folder)
            prepared.stop()
        sup.close()
    if code == 0:
        sup.say("credbroker", "stopped")
    return code


def register(sub: Any) -> None:
    p = add_command(sub, "up", "run API, worker and beat (and Flower) together, for development", """
        Run the whole broker on one machine as one process tree: the HTTP API,
        one Celery worker, beat, and optionally Flower, after `db upgrade`.
        Ctrl-C (or SIGTERM) stops them all; if one dies, all stop and the exit
        status is 1.

        With no settings at all it still works: a SQLite file, a master key
        and a transport key generated into CREDBROKER_STATE_DIR (.credbroker/,
        development only), and a private redis-server when nothing answers at
        CREDBROKER_REDIS_URL.

        --demo also starts the sandbox identity provider with one server per
        mode (demo-exchange, demo-obo, demo-connect), a demo API key and a
        signed-in user, demo-user, and prints curl commands to try.
        """, """
        credbroker up
        credbroker up --demo
        credbroker up --host 0.0.0.0 --port 9000 --workers 128 --flower
        """)
    p.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8080, help="API port (default 8080)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="worker threads of the one worker (default 64: flights wait on the provider)")
    p.add_argument("--flower", action="store_true", help="also run Flower (basic auth; generated if not set)")
    p.add_argument("--flower-port", type=port_number, default=5555, metavar="PORT", help="Flower port (default 5555)")
    p.add_argument("--demo", action="store_true", help="also run the sandbox provider with demo servers")
    p.set_defaults(handler=cmd_up)
