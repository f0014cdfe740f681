"""Integration fixtures: the sandbox provider on loopback and a broker cluster."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from broker.clock import FakeClock
from broker.oauth.client import OAuthClient
from broker.oauth.discovery import MetadataCache
from broker.oauth.sender import TokenEndpointSender, make_http_client
from broker.settings import Settings
from sandbox import SandboxProvider, run_sandbox
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


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """An httpx client for authorization servers, as the workers build it."""
    client = make_http_client(Settings(http_read_timeout=5.0))
    yield client
    client.close()


@pytest.fixture
def oauth(http: httpx.Client, clock: FakeClock) -> OAuthClient:
    """The OAuth port with short retries, on the injected clock."""
    return OAuthClient(TokenEndpointSender(http, retry_seconds=2, max_attempts=2), MetadataCache(), clock)
