"""Shared fixtures: keyrings, databases (SQLite and PostgreSQL), the secret guard.

Services: a test that needs PostgreSQL or Redis skips when it is missing on a
developer machine but fails under CI (CI=true), so a green CI run means the
service-backed tests really ran.
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from broker.clock import FakeClock
from broker.crypto import Keyring
from broker.errors import BrokerError
from broker.db import make_engine
from broker.migrate import upgrade
from tests.secrets import find_leaks

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("CREDBROKER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("CREDBROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def missing_service(what: str) -> None:
    """Skip locally, fail in CI: a CI run must never silently skip service tests."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not reachable")
    pytest.skip(f"{what} not reachable")


def make_keyring(*kids: str) -> Keyring:
    return Keyring(tuple((kid, os.urandom(32)) for kid in kids))


def key_line(kid: str, raw: bytes) -> str:
    return f"{kid}:{base64.b64encode(raw).decode()}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- databases ---------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database for this test session."""
    try:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_size=1)
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001
        yield ""
        return
    name = f"credbroker_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path):  # type: ignore[no-untyped-def]
    """A migrated, empty database: SQLite file and PostgreSQL."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        upgrade(eng)
    else:
        url = request.getfixturevalue("pg_database")
        if not url:
            missing_service("PostgreSQL at 127.0.0.1:5432")
        eng = make_engine(url)
        with eng.begin() as conn:
            conn.execute(text("TRUNCATE credentials, subject_tokens, audit_events, connection_events, event_cursors, webhook_deliveries RESTART IDENTITY"))
    yield eng
    eng.dispose()


# -- the secret guard -----------------------------------------------------------

class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001
            self.lines.append(repr(record.__dict__))


_ERROR_MESSAGES: list[str] = []
_SCANNED = {"log_lines": 0, "error_messages": 0, "tests": 0}
_original_init = BrokerError.__init__


def _recording_init(self: BrokerError, *args: object, **kwargs: object) -> None:
    _original_init(self, *args, **kwargs)  # type: ignore[arg-type]
    _ERROR_MESSAGES.append(f"{self!s} {self.to_dict()!r}")


BrokerError.__init__ = _recording_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def secret_guard() -> Iterator[_Collector]:
    """Every log line and every BrokerError message of every test, at DEBUG,
    must hold no registered test secret."""
    _ERROR_MESSAGES.clear()
    collector = _Collector()
    collector.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(collector)
    root.setLevel(logging.DEBUG)
    try:
        yield collector
    finally:
        root.removeHandler(collector)
        root.setLevel(old_level)
    leaks = find_leaks("\n".join(collector.lines))
    assert not leaks, f"{len(leaks)} test secret(s) appeared in log output"
    leaks = find_leaks("\n".join(_ERROR_MESSAGES))
    _SCANNED["log_lines"] += len(collector.lines)
    _SCANNED["error_messages"] += len(_ERROR_MESSAGES)
    _SCANNED["tests"] += 1
    assert not leaks, f"{len(leaks)} test secret(s) appeared in an error message"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The secret guard's figures, for the record."""
    from tests.secrets import all_canaries

    if _SCANNED["tests"]:
        terminalreporter.write_line(
            f"secret guard: {len(all_canaries())} test secrets registered; {_SCANNED['log_lines']} log lines "
            f"and {_SCANNED['error_messages']} error messages scanned across {_SCANNED['tests']} tests")
