"""The credbroker CLI against real services, as subprocesses configured only by
CREDBROKER_* variables: key rotation (SQLite and PostgreSQL), no secret in any
command's output, audit --follow, Flower's authentication, and `up` on a
machine with no settings at all (with and without --demo)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from broker.audit import Action, AuditEvent, Outcome, SqlAuditLog
from broker.clock import utcnow
from broker.crypto import Keyring
from broker.db import make_engine
from broker.migrate import upgrade
from broker.models import Credential, ObtainedVia, SubjectToken
from broker.secret import Secret
from broker.servers import servers_from_settings
from broker.settings import PREFIX
from broker.store import CredentialStore
from tests.cluster import Cluster, wait_for
from tests.conftest import key_line
from tests.integration.connect_browser import ConnectBrowser
from tests.secrets import assert_no_leak, canary, register

pytestmark = pytest.mark.integration


def cli_env(**settings: str) -> dict[str, str]:
    """This environment without any CREDBROKER_* variable, plus ``settings`` (names without prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update({PREFIX + k: v for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def credbroker(*args: str, env: dict[str, str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], env=env, cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- rotate-keys -------------------------------------------------------------------------------------------

N_CREDENTIALS, N_SUBJECTS = 900, 100  # 1,000 records


def keyring(*keys: tuple[str, bytes]) -> Keyring:
    return Keyring(tuple(keys))


def seed(engine: Any, ring: Keyring) -> dict[tuple[str, str], str]:
    """1,000 records under ``ring``'s active key; returns what each must decrypt to."""
    store = CredentialStore(engine, ring)
    expected: dict[tuple[str, str], str] = {}
    expires = utcnow() + timedelta(hours=1)
    for i in range(N_CREDENTIALS):
        token = register(f"cbtest-rot-{i:04d}-{os.urandom(6).hex()}")
        store.put(f"user-{i:04d}", "k" * 64, Credential(Secret(token), ObtainedVia.TOKEN_EXCHANGE, expires_at=expires))
        expected[(f"user-{i:04d}", "k" * 64)] = token
    for i in range(N_SUBJECTS):
        token = register(f"cbtest-rotsub-{i:04d}-{os.urandom(6).hex()}")
        store.put_subject_token(f"user-{i:04d}", SubjectToken(Secret(token), expires))
        expected[(f"user-{i:04d}", "")] = token
    return expected


def assert_all_readable(engine: Any, ring: Keyring, expected: dict[tuple[str, str], str]) -> None:
    store = CredentialStore(engine, ring)
    assert store.count_stale_keys() == 0
    for (user, key), token in expected.items():
        if key:
            stored = store.get(user, key)
            assert stored is not None and stored.credential.access_token.reveal() == token
        else:
            subject = store.get_subject_token(user)
            assert subject is not None and subject.token.reveal() == token
    assert store.decrypt_failures == 0


def db_url(engine: Any) -> str:
    return str(engine.url.render_as_string(hide_password=False))


def test_rotate_keys_moves_every_record_to_the_new_key(engine: Any, tmp_path: Path) -> None:
    a, b = ("A", os.urandom(32)), ("B", os.urandom(32))
    expected = seed(engine, keyring(a))
    env = cli_env(DATABASE_URL=db_url(engine), MASTER_KEYS=f"{key_line(*b)},{key_line(*a)}")

    dry = credbroker("rotate-keys", "--dry-run", "--json", env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"active_key": "B", "to_rewrite": 1000, "records_by_key": {"A": 1000}}

    done = credbroker("rotate-keys", "--batch-size", "128", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    progress = done.stderr.strip().splitlines()
    assert len(progress) == 9  # 900 credentials in 8 batches, 100 subject tokens in 1
    assert re.fullmatch(r"\[#{30}\] 1000/1000 100\.0% [\d,]+ records/s", progress[-1])
    assert "1000 rewritten, 0 unreadable" in done.stdout
    assert "0 records left under old keys" in done.stdout
    assert_no_leak(done.stdout + done.stderr + dry.stdout + dry.stderr, "rotate-keys output")

    assert_all_readable(engine, keyring(b, a), expected)
    assert_all_readable(engine, keyring(b), expected)  # A dropped: still readable

    again = credbroker("rotate-keys", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_an_interrupted_rotation_resumes(engine: Any, tmp_path: Path) -> None:
    a, b = ("A", os.urandom(32)), ("B", os.urandom(32))
    expected = seed(engine, keyring(a))
    store = CredentialStore(engine, keyring(b, a))

    def crash(_done: int) -> None:
        raise RuntimeError("interrupted after the first batch")

    with pytest.raises(RuntimeError):
        store.reencrypt(batch_size=100, on_batch=crash)
    assert store.count_stale_keys() == 900, "the first batch was committed, the rest untouched"

    env = cli_env(DATABASE_URL=db_url(engine), MASTER_KEYS=f"{key_line(*b)},{key_line(*a)}")
    resumed = credbroker("rotate-keys", "--batch-size", "100", "--json", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["rewritten"] == 900 and report["left"] == 0 and report["unreadable"] == 0
    assert resumed.stderr.strip().splitlines()[0].startswith("[") and " 100/900 " in resumed.stderr
    assert_all_readable(engine, keyring(b), expected)


def test_rotation_reports_records_it_cannot_read(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    a, b, c = ("A", os.urandom(32)), ("B", os.urandom(32)), ("C", os.urandom(32))
    for user, ring in (("alice", keyring(a)), ("bob", keyring(c))):
        CredentialStore(engine, ring).put(user, "k" * 64, Credential(Secret(canary(user)), ObtainedVia.CONNECT_FLOW))
    env = cli_env(DATABASE_URL=db_url(engine), MASTER_KEYS=f"{key_line(*b)},{key_line(*a)}")  # C is lost
    result = credbroker("rotate-keys", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "1 rewritten, 1 unreadable" in result.stdout
    assert "1 record(s) still under old keys: 1 could not be decrypted" in result.stdout
    assert_no_leak(result.stdout + result.stderr)
    engine.dispose()


# -- no secret in any command's output -----------------------------------------------------------------------


def test_no_command_prints_a_stored_secret(cluster: Cluster, sandbox: Any, tmp_path: Path) -> None:
    cluster.start_worker()
    cluster.start_beat()
    register("sandbox-client-secret-s3cr3t")  # in the servers file
    servers = servers_from_settings(cluster.settings)
    store = CredentialStore(make_engine(cluster.settings.database_url), cluster.settings.keyring)
    user = "alice@example.com"
    tokens = {name: canary(f"access-{name}") for name in ("tx", "gh")}
    expires = utcnow() + timedelta(hours=1)
    for name, token in tokens.items():
        store.put(user, servers[name].key, Credential(Secret(token), ObtainedVia.CONNECT_FLOW if name == "gh"
                                                      else ObtainedVia.TOKEN_EXCHANGE, expires_at=expires,
                                                      refresh_token=Secret(canary("refresh")), scopes=("read",)))
    store.put_subject_token(user, SubjectToken(Secret(canary("subject")), expires))
    env = cli_env(**{k[len(PREFIX):]: v for k, v in cluster.env.items()})
    servers_file = cluster.env[PREFIX + "SERVERS_FILE"]

    outputs: list[str] = []

    def run(*args: str, code: int = 0, extra: dict[str, str] | None = None) -> str:
        result = credbroker(*args, env={**env, **(extra or {})}, cwd=tmp_path)
        text = result.stdout + result.stderr
        assert result.returncode == code, f"credbroker {' '.join(args)}: {result.returncode}\n{result.stderr}"
        outputs.append(f"$ credbroker {' '.join(args)}\n{text}")
        return text

    assert "Bearer cbte…(redacted)" in run("resolve", user, "tx")
    assert json.loads(run("resolve", user, "gh", "--json"))["value"] == "Bearer cbte…(redacted)"
    assert "error: upstream_error:" in run("resolve", user, "obo", code=1)  # the canary is no sandbox token
    listing = run("credentials", "list", user)
    assert re.search(r"gh\s+oauth_connect\s+connected", listing)
    assert re.search(r"obo\s+entra_obo\s+not_connected", listing)
    rows = json.loads(run("credentials", "list", user, "--json"))
    assert {r["server"]: r["status"] for r in rows} == {"tx": "connected", "obo": "not_connected", "gh": "connected"}
    assert run("credentials", "connect", user, "gh").startswith(cluster.settings.public_url + "/v1/connect/open?state=")
    log = SqlAuditLog(store.engine)
    wait_for(lambda: log.query(user_id=user), 20, what="audit events in SQL")
    assert "inject" in run("audit", "--user", user) or "acquire" in run("audit", "--user", user)
    assert json.loads(run("audit", "--json", "--limit", "5"))
    run("db", "current")
    run("db", "upgrade")
    run("servers", "check", servers_file)
    run("servers", "check", servers_file, "--json")
    run("rotate-keys", "--dry-run")
    run("rotate-keys")
    assert "removed" in run("credentials", "rm", user, "gh")
    assert "not_connected" in run("resolve", user, "gh", code=1)
    new_key = key_line("new", os.urandom(32))
    run("rotate-keys", "--json", extra={PREFIX + "MASTER_KEYS": f"{new_key},{cluster.env[PREFIX + 'MASTER_KEYS']}"})

    assert_no_leak("\n".join(outputs), "CLI output")
    assert_no_leak(cluster.all_logs(), "worker and beat logs")
    # The scan is real: asked to, resolve does print the secret.
    shown = json.loads(credbroker("resolve", user, "tx", "--json", "--show-secret", env=env, cwd=tmp_path).stdout)
    assert shown["value"] == f"Bearer {tokens['tx']}"
    # Erasure: the tx credential was left; it goes, with the subject token.
    erased = credbroker("users", "rm", user, "--json", env=env, cwd=tmp_path)
    assert json.loads(erased.stdout) == {"user_id": user, "erased": True, "credentials_removed": 1}
    assert store.list(user) == [] and store.get_subject_token(user) is None
    assert "subject_token_missing" in run("resolve", user, "tx", code=1)


# -- audit --follow ---------------------------------------------------------------------------------------------


def lines_of(stream: IO[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in iter(stream.readline, ""):
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_audit_follow_prints_new_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = make_engine(url)
    upgrade(engine)
    log = SqlAuditLog(engine)
    log.record([AuditEvent(Action.ACQUIRE, Outcome.SUCCESS, user_id="alice", server="tx", method="token_exchange")])
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "audit", "--follow", "--json", "--interval", "0.1"],
                            env=cli_env(DATABASE_URL=url), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = lines_of(proc.stdout)
        assert json.loads(lines.get(timeout=30))["user_id"] == "alice"
        log.record([AuditEvent(Action.REFRESH, Outcome.FAILURE, user_id="bob", server="gh", reason="invalid_grant")])
        event = json.loads(lines.get(timeout=30))
        assert (event["user_id"], event["action"], event["reason"]) == ("bob", "refresh", "invalid_grant")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        engine.dispose()


# -- flower ------------------------------------------------------------------------------------------------------


def test_flower_requires_basic_auth(redis_url: str, tmp_path: Path) -> None:
    refused = credbroker("flower", env=cli_env(REDIS_URL=redis_url), cwd=tmp_path)
    assert refused.returncode == 2 and "error: config_error: Flower needs authentication" in refused.stderr

    password = canary("flower")
    port = free_port()
    out = open(tmp_path / "flower.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "flower", "--port", str(port)],
                            env=cli_env(REDIS_URL=redis_url, FLOWER_BASIC_AUTH=f"ops:{password}"), cwd=str(tmp_path),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(base + "/healthcheck", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None  # stop waiting if it died

        wait_for(up, 60, 0.2, what="flower")
        assert proc.poll() is None, out.read()
        assert httpx.get(base + "/api/workers", timeout=10).status_code == 401
        assert httpx.get(base + "/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
        assert httpx.get(base + "/api/workers", auth=("ops", password), timeout=10).status_code == 200
        # exec'd: the pid is Flower itself, and the password is not on its command line
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert "flower" in cmdline and password not in cmdline
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        out.seek(0)
        log = out.read()
        out.close()
    assert_no_leak(log, "flower output")


# -- up -------------------------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def process_tree(root: int) -> dict[int, tuple[int, str]]:
    """Every live descendant of ``root`` (and root): pid -> (start time, command line)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append(int(entry.name))
    tree: dict[int, tuple[int, str]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        st = proc_stat(pid)
        if st is None or st[0] == "Z":
            continue
        tree[pid] = (st[2], cmdline(pid))
        todo.extend(children.get(pid, []))
    return tree


def still_running(tree: dict[int, tuple[int, str]]) -> list[str]:
    """The processes of ``tree`` that still run (same pid and start time, not a zombie)."""
    left = []
    for pid, (started, line) in tree.items():
        st = proc_stat(pid)
        if st is not None and st[0] != "Z" and st[2] == started:
            left.append(f"{pid} {line}")
    return left


class Up:
    """``credbroker up`` in a fresh folder, with no settings but a Redis URL where nothing listens."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = cli_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
        self.log = open(workdir / "up.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "up", "--port", str(self.port), *args],
                                     env=env, cwd=str(workdir), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def text(self) -> str:
        return (self.workdir / "up.log").read_text(errors="replace")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"credbroker up exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> dict[int, tuple[int, str]]:
        """Wait for /healthz and for the worker's pool; return the whole process tree."""
        wait_for(self.healthy, 90, 0.2, what="credbroker up to answer /healthz")

        def full_tree() -> dict[int, tuple[int, str]] | None:
            tree = process_tree(self.proc.pid)
            pool = [p for p, (_, line) in tree.items() if "celery" in line and " worker " in line]
            # The default pool is threads: one worker process (prefork would add children).
            return tree if len(pool) >= 1 and any("redis-server" in line for _, line in tree.values()) else None

        return wait_for(full_tree, 60, 0.2, what="the worker process")  # type: ignore[no-any-return]

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed test: leave nothing behind
            for pid in process_tree(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def up_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Up] = []

    def make(*args: str) -> Up:
        up = Up(tmp_path, *args)
        started.append(up)
        return up

    yield make
    for up in started:
        up.close()


def assert_tree_gone(tree: dict[int, tuple[int, str]]) -> None:
    wait_for(lambda: not still_running(tree), 15, 0.1, what="every process of the tree to exit")


@pytest.mark.timeout(240)
def test_up_with_no_settings_comes_up_and_ctrl_c_stops_the_tree(up_factory: Any, tmp_path: Path) -> None:
    up = up_factory()
    tree = up.wait_ready()
    names = " ".join(line for _, line in tree.values())
    for part in ("workers.cli api", "celery -A workers.celery_app --quiet worker",
                 "celery -A workers.celery_app --quiet beat", "redis-server"):
        assert part in names
    state = tmp_path / ".credbroker"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert oct((state / "master.key").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "credbroker.db").exists()
    assert up.stop(signal.SIGINT) == 0
    assert_tree_gone(tree)
    text = up.text()
    assert "DEVELOPMENT ONLY" in text and "started a private redis-server" in text
    assert "SIGINT: stopping everything" in text and text.rstrip().endswith("stopped")
    assert (state / "master.key").read_text().strip() not in text


@pytest.mark.timeout(240)
def test_up_stops_everything_when_a_child_dies(up_factory: Any) -> None:
    up = up_factory()
    tree = up.wait_ready()
    api = next(pid for pid, (_, line) in tree.items() if "workers.cli api" in line)
    os.kill(api, signal.SIGKILL)
    assert up.proc.wait(timeout=60) == 1
    assert_tree_gone(tree)
    assert "error: api was killed by SIGKILL: stopping everything" in up.text()


@pytest.mark.timeout(240)
def test_up_demo_resolves_and_connects(up_factory: Any) -> None:
    up = up_factory("--demo")
    tree = up.wait_ready()
    key = wait_for(lambda: re.search(r"KEY=(\S+)", up.text()), 30, what="the demo API key").group(1)
    auth = {"Authorization": f"Bearer {key}"}
    # The instructions come last, once a worker answers: no Celery banner scrolls them away.
    printed = up.text()
    lines = printed.splitlines()
    after = lines[next(i for i, ln in enumerate(lines) if "credbroker demo is running" in ln):]
    assert all(line.startswith("credbroker|") for line in after), after
    assert "celery beat v" not in printed and "[queues]" not in printed
    # The first command works exactly as printed (a shell, the printed key).
    first_curl = next(ln.split("|", 1)[1].strip() for ln in after if ln.split("|", 1)[1].strip().startswith("curl"))
    shell = subprocess.run(["bash", "-c", first_curl], env={**os.environ, "KEY": key}, capture_output=True,
                           text=True, timeout=60)
    assert json.loads(shell.stdout)["obtained_via"] == "token_exchange", shell.stdout + shell.stderr
    register(json.loads(shell.stdout)["value"].split(" ", 1)[1])
    # BrokerClient() in the same folder finds the demo's settings (README "From Python").
    snippet = ("from workers.client import BrokerClient\n"
               "with BrokerClient() as client:\n"
               "    print(client.resolve('demo-user', 'demo-exchange', timeout=30).obtained_via)\n")
    python = subprocess.run([sys.executable, "-c", snippet], env=cli_env(REDIS_URL="redis://127.0.0.1:1/0"),
                            cwd=str(up.workdir), capture_output=True, text=True, timeout=90)
    assert python.returncode == 0 and python.stdout.strip() == "token_exchange", python.stderr[-2000:]
    with httpx.Client(base_url=up.url, headers=auth, timeout=60) as api:
        answer = api.post("/v1/resolve", json={"user_id": "demo-user", "server": "demo-exchange"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        register(body["value"].split(" ", 1)[1])
        assert body["header"] == "Authorization" and body["obtained_via"] == "token_exchange"

        answer = api.post("/v1/resolve", json={"user_id": "demo-user", "server": "demo-connect"})
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"] == "not_connected"
        with ConnectBrowser() as browser:
            page = browser.consent(answer.json()["connect_url"], user="demo-user")
            assert page.status_code == 200 and page.url.path == "/v1/connect/callback"
            assert browser.confirm(page).status_code == 200

        answer = api.post("/v1/resolve", json={"user_id": "demo-user", "server": "demo-connect"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["obtained_via"] == "connect_flow"
        register(answer.json()["value"].split(" ", 1)[1])

    # Other commands run in the same folder join the running up's settings (keys, Redis, servers).
    env = cli_env(REDIS_URL="redis://127.0.0.1:1/0")  # as dead as the one up was given
    listing = credbroker("credentials", "list", "demo-user", "--json", env=env, cwd=up.workdir)
    assert listing.returncode == 0, listing.stderr
    assert {r["server"]: r["status"] for r in json.loads(listing.stdout)} == {
        "demo-exchange": "connected", "demo-obo": "not_connected", "demo-connect": "connected"}
    resolved = credbroker("resolve", "demo-user", "demo-obo", env=env, cwd=up.workdir)
    assert resolved.returncode == 0, resolved.stderr
    assert "obtained_via: entra_obo" in resolved.stdout and "…(redacted)" in resolved.stdout
    second = credbroker("up", env=env, cwd=up.workdir)
    assert second.returncode == 2 and "already running in this folder" in second.stderr
    assert_no_leak(listing.stdout + resolved.stdout + resolved.stderr + second.stderr, "CLI output")

    assert up.stop(signal.SIGINT) == 0
    assert_tree_gone(tree)
    assert any("broker.sandbox" in line for _, line in tree.values())
    assert not (up.workdir / ".credbroker" / "session.env").exists()
    assert_no_leak(up.text(), "credbroker up output")
