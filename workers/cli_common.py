"""What every ``credbroker`` command shares: settings, output, masking, the store."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Iterable, Sequence
from typing import IO, Any

from broker.errors import BrokerError
from broker.settings import Settings, load_settings

__all__ = [
    "add_command",
    "settings",
    "environment",
    "emit_json",
    "table",
    "mask_header_value",
    "open_store",
    "configure_logging",
    "check_schema",
    "check_required",
    "REQUIRE_VARIABLE",
    "NEEDS_NO_SETTINGS",
    "UsageError",
    "port_number",
    "positive_int",
]


class UsageError(BrokerError):
    """Raised when command-line arguments are inconsistent (exit 2)."""

    code = "usage"
    http_status = 400
    default_message = "invalid arguments"


def add_command(sub: Any, name: str, summary: str, description: str, examples: str = "") -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` has a real description and examples."""
    epilog = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ") if examples else None
    return sub.add_parser(  # type: ignore[no-any-return]
        name, help=summary, description=textwrap.dedent(description).strip(), epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def environment() -> dict[str, str]:
    """This process's environment, joined to a ``credbroker up`` running in this folder.

    While ``up`` runs, the settings it filled in for its children (generated
    keys, a private Redis, the demo's servers) apply to the other commands
    run here too, exactly as they do for those children.
    """
    from .embedded import session_environment

    return session_environment()


# Comma-separated setting names (without the prefix) a process must have, for
# deployments (docker-compose.yml) that cannot make a variable required
# without also requiring it of `keygen`, which runs before the keys exist.
REQUIRE_VARIABLE = "CREDBROKER_REQUIRE"
# Commands that need no setting at all.
NEEDS_NO_SETTINGS = frozenset({"keygen", "servers"})


def check_required(environ: dict[str, str] | None = None) -> None:
    """Raise ConfigError naming every setting listed in CREDBROKER_REQUIRE that is unset or empty."""
    from broker.errors import ConfigError
    from broker.settings import SETTING_NAMES

    from .embedded import configured

    values = configured(environment() if environ is None else environ)
    names = [n.strip().upper() for n in values.get(REQUIRE_VARIABLE, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTING_NAMES]
    if unknown:
        raise ConfigError(f"{REQUIRE_VARIABLE}: not settings: {', '.join(unknown)}")
    missing = [f"CREDBROKER_{n}" for n in names if not values.get(f"CREDBROKER_{n}")]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set here ({REQUIRE_VARIABLE}); "
                          "with docker compose, put them in the .env file next to docker-compose.yml "
                          "(keys: `docker compose run --rm --no-deps -T api keygen`)")


def settings() -> Settings:
    """The ``CREDBROKER_*`` settings of this process (environment over ``.env``)."""
    return load_settings(environment())


def configure_logging(level: str = "WARNING") -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def emit_json(data: Any, out: IO[str] | None = None) -> None:
    (out or sys.stdout).write(json.dumps(data, indent=2, default=str) + "\n")


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], out: IO[str] | None = None) -> None:
    """A plain left-aligned text table; ``-`` for empty cells."""
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    stream = out or sys.stdout
    for row in [list(headers), *cells]:
        stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def mask_header_value(value: str) -> str:
    """``Bearer eyJh…(redacted)``: the scheme and four characters, enough to tell tokens apart.

    A short value shows nothing at all: four characters of a short secret are
    too large a share of it.
    """
    scheme, sep, token = value.partition(" ")
    if not sep:
        scheme, token = "", value
    shown = token[:4] if len(token) >= 16 else ""
    return f"{scheme}{sep}{shown}…(redacted)"


def open_store(s: Settings) -> Any:
    """The credential store, refusing clearly when the schema was never created."""
    from broker.db import make_engine
    from broker.store import CredentialStore

    engine = make_engine(s.database_url)
    check_schema(engine)
    return CredentialStore(engine, s.keyring)


def check_schema(engine: Any) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from broker.errors import ServiceUnavailable
    from broker.migrate import current_revision

    try:
        revision = current_revision(engine)
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"database unavailable ({type(exc).__name__})") from None
    if revision is None:
        raise ServiceUnavailable("database has no schema yet: run `credbroker db upgrade`")


def port_number(text: str) -> int:
    """An argparse type: a TCP port."""
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("must be between 1 and 65535")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
