"""Integration fixtures: the sandbox provider on loopback and a broker cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.sandbox import SandboxProvider, run_sandbox
from tests.cluster import Cluster, redis_available
from tests.conftest import REDIS_TEST_URL, missing_service


@pytest.fixture
def sandbox() -> Iterator:  # type: ignore[type-arg]
    with run_sandbox(SandboxProvider()) as handle:
        yield handle


@pytest.fixture
def redis_url() -> str:
    if not redis_available(REDIS_TEST_URL):
        missing_service("Redis at 127.0.0.1:6379")
    return REDIS_TEST_URL


@pytest.fixture
def cluster(tmp_path, sandbox) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    c = Cluster(tmp_path, sandbox.url)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """The session's PostgreSQL test database, emptied."""
    from sqlalchemy import text

    from broker.db import make_engine

    if not pg_database:
        missing_service("PostgreSQL at 127.0.0.1:5432")
    eng = make_engine(pg_database)
    with eng.begin() as conn:
        conn.execute(text("TRUNCATE credentials, subject_tokens, audit_events, connection_events, event_cursors, webhook_deliveries RESTART IDENTITY"))
    eng.dispose()
    return pg_database
