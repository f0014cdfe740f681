"""The processes the bench measures: Redis (started when absent), the sandbox
identity provider, Celery workers and beat, the HTTP API.

Adapted from ``tests/cluster.py`` (the bench must not import tests): workers
run ``-A bench.celery_bench`` so the no-op task shares their processes, and
log at WARNING so per-task log lines do not weigh on the figures.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from broker.db import make_engine
from broker.migrate import upgrade
from broker.models import SubjectToken
from broker.secret import Secret
from broker.settings import Settings, load_settings
from broker.store import CredentialStore

from .celery_bench import READY_DIR_ENV

__all__ = ["BenchCluster", "RedisService", "Sandbox", "wait_for", "free_port", "REPO"]

REPO = Path(__file__).resolve().parent.parent
CLIENT_SECRET = "bench-client-secret-0123456789"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class RedisService:
    """The Redis at ``url`` if it answers, else a private ``redis-server`` on a free port."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if not _answers(url):
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError(f"no Redis at {url} and no redis-server on PATH to start one")
            port = free_port()
            self.proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--dir", str(workdir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            db = url.rsplit("/", 1)[-1] if url.rsplit("/", 1)[-1].isdigit() else "0"
            url = f"redis://127.0.0.1:{port}/{db}"
            wait_for(lambda: _answers(url), 10, "the private redis-server")
        self.url = url
        self.started = self.proc is not None

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class Sandbox:
    """``python -m broker.sandbox`` as its own process, driven over ``/_admin``."""

    def __init__(self, workdir: Path, latency_ms: int = 0) -> None:
        self.log = open(workdir / "sandbox.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.sandbox", "--port", "0", "--latency-ms", str(latency_ms),
             "--client", f"broker-client:{CLIENT_SECRET}"],
            stdout=subprocess.PIPE, stderr=self.log, env=_child_env({}), cwd=str(REPO), start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("http"):
            raise RuntimeError("the sandbox provider did not start; see sandbox.log")
        self.url = line
        self.http = httpx.Client(base_url=line, timeout=30)

    def set_latency(self, ms: int) -> None:
        self.http.post("/_admin/latency", json={"endpoint": "token", "ms": ms}).raise_for_status()

    def configure(self, **values: Any) -> None:
        self.http.post("/_admin/config", json=values).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/_admin/stats")
        response.raise_for_status()
        return dict(response.json())

    def token_calls(self, user: str | None = None) -> int:
        """Token-endpoint grants so far, for one user or all."""
        stats = self.stats()
        grants = stats["by_user"].get(user, {}) if user is not None else stats["grants"]
        return int(sum(grants.values()))

    def subject_token(self, user: str, ttl: int) -> str:
        response = self.http.post("/test/subject-token", json={"user_id": user, "ttl": ttl})
        response.raise_for_status()
        return str(response.json()["access_token"])

    def stop(self) -> None:
        self.http.close()
        _stop(self.proc)
        self.log.close()


def bench_servers(sandbox_url: str, hung_url: str | None = None) -> list[dict[str, Any]]:
    """Token-exchange style servers: fast path and misses use ``tx`` and
    ``obo``; the proactive-refresh row has ``rf`` to itself; ``dp`` is ``tx``
    with DPoP, for the proof-cost row; the isolation row has ``iso`` (beside
    ``hung``, a token endpoint that never answers), the backlog row ``bl``."""
    ab = {"token_endpoint": f"{sandbox_url}/token", "client_id": "broker-client", "client_secret": CLIENT_SECRET}
    hung = [] if hung_url is None else [
        {"name": "hung", "url": "https://hung.upstream.test/mcp",
         "auth_broker": {"mode": "oauth_connect", "token_endpoint": f"{hung_url}/token",
                         "authorization_endpoint": f"{hung_url}/authorize", "client_id": "broker-client",
                         "client_secret": CLIENT_SECRET, "scopes": ["read"]}}]
    return [*hung,
        {"name": "iso", "url": "https://iso.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "iso-api", "scopes": ["read"]}},
        {"name": "bl", "url": "https://bl.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "bl-api", "scopes": ["read"]}},
        {"name": "tx", "url": "https://tx.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "tx-api", "scopes": ["read"]}},
        {"name": "obo", "url": "https://obo.upstream.test/mcp",
         "auth_broker": {"mode": "entra_obo", **ab, "scopes": ["api://obo/.default"]}},
        {"name": "rf", "url": "https://rf.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "rf-api", "scopes": ["read"]}},
        {"name": "dp", "url": "https://dp.upstream.test/mcp",
         "auth_broker": {"mode": "token_exchange", **ab, "audience": "tx-api", "scopes": ["read"], "dpop": True}},
    ]


class BenchCluster:
    """Settings, database and the broker's processes for one bench run."""

    def __init__(self, workdir: Path, redis_url: str, sandbox: Sandbox, *, database_url: str | None = None,
                 extra_env: dict[str, str] | None = None, hung_url: str | None = None) -> None:
        self.workdir = workdir
        self.sandbox = sandbox
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        self.redis.flushdb()
        servers_file = workdir / "servers.yaml"
        servers_file.write_text(yaml.safe_dump({"servers": bench_servers(sandbox.url, hung_url)}))
        self.database_url = database_url or f"sqlite:///{workdir / 'broker.db'}"
        self.api_key = base64.urlsafe_b64encode(os.urandom(24)).decode()
        self.env = {
            "CREDBROKER_REDIS_URL": redis_url,
            "CREDBROKER_DATABASE_URL": self.database_url,
            "CREDBROKER_MASTER_KEYS": "bench1:" + base64.b64encode(os.urandom(32)).decode(),
            "CREDBROKER_TRANSPORT_KEY": base64.b64encode(os.urandom(32)).decode(),
            "CREDBROKER_SERVERS_FILE": str(servers_file),
            "CREDBROKER_API_KEYS": self.api_key,
            "CREDBROKER_LOG_LEVEL": "WARNING",
            READY_DIR_ENV: str(workdir),
            **(extra_env or {}),
        }
        self.settings: Settings = load_settings(self.env, env_file=None)
        engine = make_engine(self.settings.database_url)
        upgrade(engine)
        engine.dispose()
        self.store = CredentialStore(make_engine(self.settings.database_url), self.settings.keyring)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- processes -------------------------------------------------------------

    def spawn(self, name: str, args: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        popen.setdefault("stdout", log)
        proc = subprocess.Popen([sys.executable, *args], stderr=log, env=_child_env(self.env), cwd=str(REPO),
                                start_new_session=True, **popen)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_workers(self, count: int, concurrency: int) -> list[str]:
        """``count`` worker process trees of ``concurrency`` prefork children each; waits until all consume."""
        names = []
        for i in range(count):
            name = f"w{i + 1}"
            hostname = f"{name}@{socket.gethostname()}"
            self.spawn(name, ["-m", "celery", "-A", "bench.celery_bench", "worker", "-c", str(concurrency),
                              "-P", "prefork", "-n", hostname, "--without-gossip", "--without-mingle",
                              "--without-heartbeat", "-Q", "credbroker,credbroker.refresh", "--loglevel=WARNING"])
            names.append(name)
        for name in names:
            ready = self.workdir / f"{name}@{socket.gethostname()}"
            proc = self.procs[name]

            def up(ready: Path = ready, proc: subprocess.Popen[bytes] = proc) -> bool:
                return ready.exists() or proc.poll() is not None

            wait_for(up, 90, f"worker {name}")
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited:\n{self.log(name)[-3000:]}")
        return names

    def start_beat(self) -> None:
        self.spawn("beat", ["-m", "celery", "-A", "bench.celery_bench", "beat", "-s",
                            str(self.workdir / "beat-schedule"), "--loglevel=INFO"])
        wait_for(lambda: "beat: Starting" in self.log("beat") or self.procs["beat"].poll() is not None, 60,
                 "beat")

    def stop_proc(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            _stop(proc)

    def start_api(self) -> str:
        """The HTTP API (``workers.api.serve_api``) in its own process; returns its base URL."""
        port = free_port()
        code = ("import sys; from broker.settings import load_settings; from workers.api import serve_api; "
                "serve_api(load_settings(env_file=None), '127.0.0.1', int(sys.argv[1]))")
        proc = self.spawn("api", ["-c", code, str(port)])
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the HTTP API", interval=0.1)
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited:\n{self.log('api')[-3000:]}")
        return url

    def client(self, **kwargs: Any) -> Any:
        from workers.client import BrokerClient

        return BrokerClient(settings=self.settings, **kwargs)

    def pids(self, name: str) -> list[int]:
        """The process and its descendants."""
        proc = self.procs.get(name)
        return [] if proc is None else process_tree(proc.pid)

    # -- data ------------------------------------------------------------------

    def sign_in(self, users: list[str], ttl: int = 86400) -> None:
        """Store a sandbox-issued subject token for each user."""
        from broker.clock import utcnow
        from datetime import timedelta

        expires = utcnow() + timedelta(seconds=ttl)
        for user in users:
            token = self.sandbox.subject_token(user, ttl)
            self.store.put_subject_token(user, SubjectToken(Secret(token), expires))

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_proc(name)
        self.store.engine.dispose()
        self.redis.close()


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of a live process, KiB (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
