"""Redis deployment plumbing: Sentinel URLs, the namespace on every name,
the servers fingerprint, and deadlines on a socket that never answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from broker import keyspace
from broker.errors import ConfigError, ConfigMismatch, error_from_dict
from broker.servers import parse_servers
from broker.settings import load_settings
from workers.common import constants
from workers.celery.app import make_celery
from workers.common.deadline import DeadlineConnection, DeadlinePool, remaining, within
from workers.common.redisconn import parse_redis_url

SENTINEL_URL = "sentinel://:pw%40x@10.0.0.1:26379;sentinel://:pw%40x@10.0.0.2:26380/3?master_name=mymaster"


def settings(**env: str):  # type: ignore[no-untyped-def]
    return load_settings({"CREDBROKER_" + k: v for k, v in env.items()}, env_file=None)


@pytest.fixture(autouse=True)
def _process_namespace() -> Iterator[None]:
    before = keyspace.namespace()
    yield
    keyspace.set_namespace(before)


# -- Sentinel URLs ---------------------------------------------------------------


def test_sentinel_url_parsed_for_redis_py_and_celery() -> None:
    t = parse_redis_url(SENTINEL_URL)
    assert t.is_sentinel and t.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (t.master_name, t.db, t.password) == ("mymaster", 3, "pw@x")
    assert "pw@x" not in repr(t)
    assert t.celery_url == SENTINEL_URL.split("?")[0]
    app = make_celery(settings(REDIS_URL=SENTINEL_URL))
    assert app.conf.broker_url == t.celery_url
    assert app.conf.broker_transport_options["master_name"] == "mymaster"
    assert app.conf.result_backend_transport_options["master_name"] == "mymaster"
    assert app.conf.result_backend.startswith("workers.celery.backend:FlightSentinelBackend+sentinel://")
    assert app.conf.broker_transport.endswith(":SentinelTransport")


def test_plain_url_unchanged() -> None:
    t = parse_redis_url("redis://127.0.0.1:6379/2")
    assert not t.is_sentinel and t.celery_url == "redis://127.0.0.1:6379/2"


@pytest.mark.parametrize("url", [
    "sentinel://10.0.0.1:26379",                      # no master name
    "sentinel://10.0.0.1:26379;redis://x:1/0?master_name=m",  # mixed schemes
    "sentinel://:26379/0?master_name=m",              # no host
])
def test_bad_sentinel_urls_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="CREDBROKER_REDIS_URL"):
        settings(REDIS_URL=url)


# -- namespace ---------------------------------------------------------------------


def test_empty_namespace_keeps_historical_names() -> None:
    keyspace.set_namespace("")
    assert constants.cache_key("u", "k").startswith("credbroker:cache:")
    assert constants.result_key("cbf-1") == "celery-task-meta-cbf-1"
    assert constants.audit_stream() == "credbroker:audit"
    conf = make_celery(settings()).conf
    assert "global_keyprefix" not in conf.broker_transport_options
    assert "global_keyprefix" not in conf.result_backend_transport_options


def test_namespace_prefixes_every_name() -> None:
    keyspace.set_namespace("team-a")
    names = [constants.cache_key("u", "k"), constants.flight_key("u", "k"), constants.result_key("t"),
             constants.audit_stream(), constants.used_zset(), constants.beat_lock(),
             constants.pending_connect_key("u", "k"), constants.metrics_hash()]
    assert all(n.startswith("team-a:credbroker:") or n.startswith("team-a:celery-task-meta-") for n in names)
    from broker.state import state_key

    assert state_key("s").startswith("team-a:credbroker:connect:")
    # An explicit namespace (a client of another deployment) wins over the process's.
    assert constants.cache_key("u", "k", "b").startswith("b:credbroker:cache:")
    assert constants.cache_key("u", "k", "").startswith("credbroker:cache:")
    conf = make_celery(settings(NAMESPACE="team-b")).conf
    assert conf.broker_transport_options["global_keyprefix"] == "team-b:"
    assert conf.result_backend_transport_options["global_keyprefix"] == "team-b:"


@pytest.mark.parametrize("bad", ["-a", "a b", "a:b", "x" * 65, "ü"])
def test_bad_namespace_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="CREDBROKER_NAMESPACE"):
        settings(NAMESPACE=bad)


# -- servers fingerprint ------------------------------------------------------------------


def _servers(endpoint: str, secret: str):  # type: ignore[no-untyped-def]
    return parse_servers({"servers": [{"name": "gh", "url": "https://gh.test/mcp", "auth_broker": {
        "mode": "oauth_connect", "token_endpoint": endpoint, "authorization_endpoint": "https://idp.test/a",
        "client_id": "c", "client_secret": secret}}]})


def test_fingerprint_follows_configuration_not_secrets() -> None:
    a = _servers("https://idp.test/token", "s1").fingerprint
    assert a == _servers("https://idp.test/token", "s1").fingerprint
    assert a == _servers("https://idp.test/token", "another-secret").fingerprint
    assert a != _servers("https://other.test/token", "s1").fingerprint
    assert len(a) == 16


def test_config_mismatch_error_round_trips() -> None:
    exc = error_from_dict(ConfigMismatch().to_dict())
    assert isinstance(exc, ConfigMismatch) and exc.http_status == 503 and "CREDBROKER_NAMESPACE" in exc.message


# -- deadlines ---------------------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback listener that accepts connections and never answers, as a
    paused Redis does."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()[1]
    stop.set()
    t.join(2)
    for s in accepted:
        s.close()
    server.close()


def test_deadline_bounds_connect_and_read_on_a_silent_redis(silent_server: int) -> None:
    pool = DeadlinePool(connection_class=DeadlineConnection, host="127.0.0.1", port=silent_server,
                        socket_timeout=10, socket_connect_timeout=10, timeout=10, max_connections=2)
    client = redis.Redis.from_pool(pool)
    started = time.monotonic()
    with within(time.monotonic() + 0.3), pytest.raises(redis.RedisError):
        client.get("k")
    assert time.monotonic() - started < 0.6
    assert remaining() is None  # the deadline ends with its block
    # Without a deadline the configured socket timeout applies.
    assert pool.timeout == 10


def test_pool_wait_bounded_by_deadline() -> None:
    pool = DeadlinePool(host="127.0.0.1", port=1, timeout=10)
    with within(time.monotonic() + 0.2):
        assert 0 < pool.timeout <= 0.2
    with within(time.monotonic() - 1):
        assert pool.timeout == 0


def test_embedded_probe_understands_sentinel_urls() -> None:
    from workers.common.embedded import redis_answers

    # Nothing listens on port 1: the probe answers False instead of failing on the scheme.
    assert redis_answers("sentinel://127.0.0.1:1/0?master_name=m", timeout=0.2) is False


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/none.sock?db=0"])
def test_every_plain_scheme_builds_connections(url: str) -> None:
    from broker.settings import Settings
    from workers.common.redisconn import redis_client

    conn = redis_client(Settings(redis_url=url)).connection_pool.make_connection()
    assert conn.socket_timeout == 5.0
