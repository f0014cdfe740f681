"""``credbroker``: the command line of credential-broker.

Commands live in small modules (``cli_up``, ``cli_procs``, ``cli_admin``,
``cli_users``); this one builds the parser and turns errors into exit codes:
2 for usage and configuration errors, 1 for runtime failures, 130 for Ctrl-C.
Errors print as ``error: <code>: <message>`` on stderr; no command prints a
secret unless asked to (``resolve --show-secret``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import redis

from broker.errors import BrokerError, ConfigError, InvalidRequest, UnknownServer

from . import cli_admin, cli_events, cli_procs, cli_up, cli_users
from .cli_common import NEEDS_NO_SETTINGS, UsageError, check_required

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = ("up", "api", "worker", "beat", "flower", "keygen", "rotate-keys", "resolve", "credentials", "audit",
            "db", "servers", "users", "warm", "events")
# Errors that mean "the command line or the configuration is wrong" (exit 2).
_USAGE_ERRORS = (ConfigError, InvalidRequest, UnknownServer, UsageError)

_DESCRIPTION = """\
credential-broker: per-user upstream credentials for gateways, on Celery and Redis.

Settings come from CREDBROKER_* environment variables and an optional .env
file in the working directory (DATABASE_URL, REDIS_URL, MASTER_KEYS,
TRANSPORT_KEY, SERVERS_FILE, API_KEYS, PUBLIC_URL, ...). Run
`credbroker COMMAND --help` for each command."""

_EPILOG = """\
examples:
  credbroker up --demo                          # everything on one machine, with a demo
  credbroker keygen                             # a master key entry
  credbroker servers check servers.yaml
  credbroker resolve alice@example.com github   # the header value is masked
  credbroker credentials list alice@example.com
  credbroker audit --follow"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="credbroker", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_up.register(sub)
    cli_procs.register(sub)
    cli_admin.register(sub)
    cli_users.register(sub)
    cli_events.register(sub)
    return parser


def _report(exc: BrokerError) -> None:
    print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
    for key, value in exc.extra().items():
        if value is not None:  # connect_url, reason, status, oauth_error: secret-free by contract
            print(f"  {key}: {value}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command not in NEEDS_NO_SETTINGS:
            check_required()
        return int(args.handler(args) or 0)
    except _USAGE_ERRORS as exc:
        _report(exc)
        return 2
    except BrokerError as exc:
        _report(exc)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except redis.RedisError as exc:
        print(f"error: unavailable: Redis unavailable ({type(exc).__name__})", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: os_error: {exc.strerror or type(exc).__name__}{where}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a driver's message may quote values: name the type only
        print(f"error: internal_error: unexpected {type(exc).__module__}.{type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
