"""A real broker cluster for integration tests: Redis, a database, the sandbox
identity provider over HTTP, and Celery workers and beat as OS processes."""

from __future__ import annotations

import atexit
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import yaml

from broker.db import make_engine
from broker.migrate import upgrade
from broker.settings import Settings, load_settings

__all__ = ["Cluster", "wait_for", "wait_for_beat_scans", "sandbox_servers", "read_all_redis"]

def _pick_redis_db() -> int:
    """A Redis database number of this test process's own (1-12), claimed with a
    lock key in db 0, so parallel test runs on one machine never flush or share
    each other's cluster. db 13 is the benchmark's, 15 the unit tests'."""
    if "CREDBROKER_TEST_REDIS_DB" in os.environ:
        return int(os.environ["CREDBROKER_TEST_REDIS_DB"])
    try:
        lock = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_connect_timeout=1)
        for n in range(1, 13):
            key = f"credbroker-test:db-lock:{n}"
            if lock.set(key, os.getpid(), nx=True, ex=3600):
                atexit.register(lambda k=key: _release(lock, k))
                return n
    except redis.RedisError:
        pass
    return 1 + os.getpid() % 12


def _release(client: redis.Redis, key: str) -> None:
    try:
        if client.get(key) == str(os.getpid()).encode():
            client.delete(key)
    except redis.RedisError:
        pass


REDIS_DB = _pick_redis_db()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sandbox_servers(sandbox_url: str, *, client_id: str = "broker-client",
                    client_secret: str = "sandbox-client-secret-s3cr3t") -> list[dict[str, Any]]:
    """One server per mode against the sandbox provider."""
    ab = {"token_endpoint": f"{sandbox_url}/token", "client_id": client_id, "client_secret": client_secret}
    return [
        {"name": "tx", "url": "https://tx.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "tx-api", "scopes": ["read"]}},
        {"name": "obo", "url": "https://obo.upstream.test/mcp",
         "auth_broker": {"mode": "entra_obo", **ab, "scopes": ["api://obo/.default"]}},
        {"name": "gh", "url": "https://gh.upstream.test/mcp",
         "auth_broker": {"mode": "oauth_connect", **ab, "authorization_endpoint": f"{sandbox_url}/authorize",
                         "revocation_endpoint": f"{sandbox_url}/revoke", "scopes": ["repo"]}},
    ]


def _admin_redis(url: str) -> redis.Redis:
    """The test's own client of the cluster's Redis (through Sentinel if so)."""
    if url.startswith("sentinel://"):
        from workers.common.redisconn import redis_client

        return redis_client(load_settings({"CREDBROKER_REDIS_URL": url}, env_file=None))
    return redis.Redis.from_url(url)


def wait_for_beat_scans(client: redis.Redis, scans: int, timeout: float = 20.0) -> None:
    """Wait until the beat has finished ``scans`` more due scans (its cluster
    counter), so a "nothing was sent during N scans" check spans real scans."""
    from workers.common.metrics import _field
    from workers.common.constants import metrics_hash

    field = _field("credbroker_beat_scans_total", {})

    def count() -> int:
        return int(client.hget(metrics_hash(), field) or 0)

    target = count() + scans
    wait_for(lambda: count() >= target, timeout, 0.05, what=f"{scans} beat scans")


def redis_available(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class Cluster:
    """Processes and settings of one test cluster; ``stop()`` ends them all."""

    def __init__(self, workdir: Path, sandbox_url: str, *, database_url: str | None = None,
                 servers: list[dict[str, Any]] | None = None, extra_env: dict[str, str] | None = None,
                 redis_url: str | None = None) -> None:
        self.workdir = workdir
        self.sandbox_url = sandbox_url
        self.redis_url = redis_url or f"redis://127.0.0.1:6379/{REDIS_DB}"
        self.redis = _admin_redis(self.redis_url)
        self.redis.flushdb()
        servers_file = workdir / "servers.yaml"
        servers_file.write_text(yaml.safe_dump({"servers": servers or sandbox_servers(sandbox_url)}))
        self.database_url = database_url or f"sqlite:///{workdir / 'broker.db'}"
        self.master_key = base64.b64encode(os.urandom(32)).decode()
        self.transport_key = base64.b64encode(os.urandom(32)).decode()
        self.env = {
            "CREDBROKER_REDIS_URL": self.redis_url,
            "CREDBROKER_DATABASE_URL": self.database_url,
            "CREDBROKER_MASTER_KEYS": f"test1:{self.master_key}",
            "CREDBROKER_TRANSPORT_KEY": self.transport_key,
            "CREDBROKER_SERVERS_FILE": str(servers_file),
            "CREDBROKER_PUBLIC_URL": "http://127.0.0.1:18080",
            "CREDBROKER_HTTP_READ_TIMEOUT": "3",
            "CREDBROKER_PROVIDER_RETRY_SECONDS": "4",
            "CREDBROKER_LOG_LEVEL": "INFO",
            **(extra_env or {}),
        }
        self.settings: Settings = load_settings(self.env, env_file=None)
        engine = make_engine(self.settings.database_url)
        upgrade(engine)
        engine.dispose()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log_path = self.workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True)
        self.procs[name] = proc
        self.logs[name] = log_path
        return proc

    def start_worker(self, name: str = "w1", concurrency: int = 2, pool: str = "prefork") -> subprocess.Popen[bytes]:
        proc = self._spawn(name, ["-m", "celery", "-A", "workers.celery.app", "worker", "-c", str(concurrency),
                                  "-P", pool, "-n", f"{name}@{socket.gethostname()}", "--without-gossip",
                                  "--without-mingle", "-Q", "credbroker,credbroker.refresh", "--loglevel=INFO"])
        wait_for(lambda: b" ready." in self.logs[name].read_bytes() or proc.poll() is not None, 60,
                 what=f"worker {name} to be ready")
        assert proc.poll() is None, self.log(name)[-3000:]
        return proc

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        schedule = self.workdir / f"{name}-schedule"
        proc = self._spawn(name, ["-m", "celery", "-A", "workers.celery.app", "beat", "-s", str(schedule),
                                  "--loglevel=INFO"])
        wait_for(lambda: b"beat: Starting" in self.logs[name].read_bytes() or proc.poll() is not None, 30,
                 what="beat to start")
        return proc

    def client(self, **kwargs: Any) -> Any:
        from workers.client import BrokerClient

        return BrokerClient(settings=self.settings, **kwargs)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def all_logs(self) -> str:
        return "\n".join(self.log(n) for n in self.logs)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=20)

    def stop(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.redis.close()


def read_all_redis(r: redis.Redis) -> str:
    """Every key and value in the database, read with the type's own command."""
    parts: list[str] = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        parts.append(key.decode(errors="replace"))
        if kind == "string":
            parts.append(repr(r.get(key)))
        elif kind == "hash":
            parts.append(repr(r.hgetall(key)))
        elif kind == "list":
            parts.append(repr(r.lrange(key, 0, -1)))
        elif kind == "set":
            parts.append(repr(r.smembers(key)))
        elif kind == "zset":
            parts.append(repr(r.zrange(key, 0, -1, withscores=True)))
        elif kind == "stream":
            parts.append(repr(r.xrange(key)))
    return "\n".join(parts)
