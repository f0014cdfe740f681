"""First-hour errors against a real Redis of our own (issue 14, items 3 and 8).

A private redis-server (tests/faults.py), so nothing here touches the shared
Redis: a resolve with no worker running leaves its task in that Redis's queue.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.errors import ConfigError, ResolveTimeout
from broker.servers import parse_servers
from broker.settings import PREFIX
from tests.faults import PrivateRedis, free_port
from workers.client import BrokerClient
from workers.embedded import redis_reachable

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_that_answers_on_a_missing_db_is_reported_precisely(private_redis: PrivateRedis,
                                                                  tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/99"
    with pytest.raises(ConfigError, match=r"CREDBROKER_REDIS_URL: Redis at 127\.0\.0\.1:\d+ answers but has "
                                          r"no database 99 \(DB index is out of range"):
        redis_reachable(url)
    assert redis_reachable(private_redis.url) is True
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)} | {PREFIX + "REDIS_URL": url}
    up = subprocess.run([sys.executable, "-m", "workers.cli", "up", "--port", str(free_port())], env=env,
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert up.returncode == 2, up.stderr
    assert "answers but has no database 99" in up.stderr
    assert "started a private redis-server" not in up.stderr
    assert not (tmp_path / ".credbroker").exists(), "no key generated, no Redis started"


def test_a_resolve_with_no_worker_says_to_start_one(private_redis: PrivateRedis) -> None:
    servers = parse_servers({"servers": [
        {"name": "tx", "url": "https://tx.example/mcp",
         "auth_broker": {"mode": "token_exchange", "token_endpoint": "https://idp.example/token"}}]})
    transport = base64.b64encode(os.urandom(32)).decode()
    with BrokerClient(redis_url=private_redis.url, servers=servers, transport_key=transport,
                      environ={}) as client:
        started = time.monotonic()
        with pytest.raises(ResolveTimeout) as caught:
            client.resolve("alice", "tx", timeout=1.0)
        assert time.monotonic() - started < 5
    message = caught.value.message
    assert "1 task(s) wait in the queue and no worker took them" in message
    assert "credbroker worker" in message
    assert redis.Redis(port=private_redis.port).llen("credbroker") == 1
