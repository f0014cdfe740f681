"""What a new user meets in the first hour (issue 14, items 1-9), without services.

Each test reproduces one thing that got in a new user's way and asserts what
they now see: the message, the exit status, the file mode, the README line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from broker.audit import Action, AuditEvent, MemoryAuditSink, Outcome, SqlAuditLog
from broker.clock import FakeClock
from broker.connect import ConnectFlow
from broker.crypto import generate_key_line
from broker.db import make_engine
from broker.errors import UnknownServer
from broker.migrate import upgrade
from broker.models import Credential, ObtainedVia
from broker.secret import Secret
from broker.servers import ServerRegistry, parse_servers
from broker.settings import PREFIX, load_settings
from broker.store import CredentialStore
from tests.secrets import canary
from tests.unit.test_cli import clean_env, run  # noqa: F401 - clean_env is an autouse fixture
from workers.cli import main as cli
from workers.cli import procs as cli_procs
from workers.common import embedded
from workers.cli.demo import instructions

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- 1: the settings of a running `up` reach BrokerClient() and commands beside it ----------------


def test_session_environment_joins_a_running_up(tmp_path: Path) -> None:
    folder = embedded.ensure_state_dir(tmp_path / ".credbroker")
    embedded.write_session(folder, {PREFIX + "SERVERS_FILE": "/x/demo-servers.yaml"}, pid=os.getpid())
    env = embedded.session_environment({"HOME": "/root"})
    assert env[PREFIX + "SERVERS_FILE"] == "/x/demo-servers.yaml" and env["HOME"] == "/root"
    # The file is owner-only, and sourcing it in a shell sets CREDBROKER_* variables only.
    assert stat.S_IMODE((folder / "session.env").stat().st_mode) == 0o600
    names = [ln.split("=", 1)[0] for ln in (folder / "session.env").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert names and all(n.startswith(PREFIX) for n in names)


def test_a_session_left_by_a_dead_up_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = embedded.ensure_state_dir(tmp_path / ".credbroker")
    embedded.write_session(folder, {PREFIX + "SERVERS_FILE": "/x/demo.yaml"}, pid=dead.pid)
    assert PREFIX + "SERVERS_FILE" not in embedded.session_environment({})


# -- 2: a taken port is named before anything starts --------------------------------------------------


def test_up_on_a_taken_port_says_which_and_suggests_another(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        code, out, err = run(capsys, "up", "--port", str(port))
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
    assert "credbroker is up" not in out + err
    assert not (tmp_path / ".credbroker").exists(), "nothing was generated or started"


# -- 3: a wrong Redis URL is named, not an internal error ---------------------------------------------


def test_up_with_an_http_redis_url_names_the_variable(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(PREFIX + "REDIS_URL", "http://localhost:6379")
    code, _, err = run(capsys, "up", "--port", str(free_port()))
    assert code == 2
    assert err.startswith("error: config_error: CREDBROKER_REDIS_URL: scheme must be one of redis")
    assert "internal_error" not in err
    assert not (tmp_path / ".credbroker").exists()


def test_nothing_listening_is_not_reachable() -> None:
    assert embedded.redis_reachable(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5) is False


# -- 4: the README's test section installs the test extra ---------------------------------------------


def test_readme_test_section_installs_the_test_extra() -> None:
    section = README[README.index("## Test"):README.index("### Interoperability")]
    install = section.index("pip install -e '.[test]'")
    assert install < section.index("python -m pytest"), "install first, then run"
    assert "install -q -e '.[test]'" in (ROOT / ".ci" / "run").read_text(), "CI installs the same"


# -- 5: the tour is what `up --demo` prints, and its first command works as printed -------------------


def test_readme_tour_is_the_demo_printout() -> None:
    tour = README[README.index("## One-minute tour"):README.index("From Python")]
    printed = instructions("http://127.0.0.1:8080", "http://127.0.0.1:40000", "cbdemo-x",
                           Path("/path/to/.credbroker/session.env"))
    commands = [ln.strip() for ln in printed.splitlines() if ln.strip().startswith(("curl", "#"))]
    assert len(commands) >= 10
    for line in commands:
        assert line in tour, f"README tour lacks: {line}"
    first_curl = next(ln for ln in tour.splitlines() if ln.startswith("curl"))
    assert "/v1/resolve" in first_curl and "<" not in first_curl, "the first command works as printed"
    assert "already stored a sandbox subject token" in tour


def test_up_runs_worker_and_beat_without_celery_banners() -> None:
    parser = cli.build_parser()
    settings = load_settings({}, env_file=None)
    worker = cli_procs.worker_argv(parser.parse_args(["worker", "--quiet"]), settings)
    beat = cli_procs.beat_argv(parser.parse_args(["beat", "--quiet"]), settings)
    for argv, command in ((worker, "worker"), (beat, "beat")):
        assert argv.index("--quiet") < argv.index(command), "a global celery option, before the command"
    plain = cli_procs.worker_argv(parser.parse_args(["worker"]), settings)
    assert "--quiet" not in plain
    up_source = (ROOT / "workers" / "cli" / "up.py").read_text()
    assert 'quiet.append("--quiet")' in up_source


# -- 6: log level, .gitignore, beat's file modes, command names ------------------------------------


def test_readme_says_what_up_does_to_the_log_level() -> None:
    row = next(ln for ln in README.splitlines() if ln.startswith("| `CREDBROKER_LOG_LEVEL`"))
    assert "`INFO`" in row and "`WARNING`" in row and "credbroker up" in row


def test_gitignore_covers_sqlite_side_files(tmp_path: Path) -> None:
    for name in ("credbroker.db", "credbroker.db-shm", "credbroker.db-wal", "credbroker.db-journal"):
        probe = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert probe.returncode == 0, f"{name} is not ignored"


def test_beat_schedule_files_are_owner_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    old = state / "celerybeat-schedule.dat"
    old.write_text("x")
    old.chmod(0o644)
    monkeypatch.setenv(PREFIX + "STATE_DIR", str(state))
    seen: dict[str, int] = {}

    def fake_exec(argv: list[str], env: object = None) -> None:
        # What beat's shelve would get: the umask in force at exec.
        current = os.umask(0)
        os.umask(current)
        seen["umask"] = current

    monkeypatch.setattr(cli_procs, "_exec", fake_exec)
    saved = os.umask(0o022)
    try:
        cli_procs.cmd_beat(cli.build_parser().parse_args(["beat"]))
    finally:
        os.umask(saved)
    assert seen["umask"] & 0o077 == 0o077
    assert stat.S_IMODE(old.stat().st_mode) == 0o600, "an existing world-readable schedule is tightened"


def test_readme_names_real_commands() -> None:
    assert "`credentials connect USER SERVER`" in README
    assert not re.search(r"`credbroker connect\b", README)
    parser = cli.build_parser()
    for argv in (["credentials", "connect", "u", "s"], ["credentials", "rm", "u", "s"], ["audit", "--limit", "5"]):
        parser.parse_args(argv)


# -- 7: the CLI and HTTP agree ----------------------------------------------------------------------


def _database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, str]:
    url = f"sqlite:///{tmp_path / 'cb.db'}"
    monkeypatch.setenv(PREFIX + "DATABASE_URL", url)
    engine = make_engine(url)
    upgrade(engine)
    return engine, url


def test_cli_audit_is_newest_first_like_http_and_capped_alike(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    engine, _ = _database(tmp_path, monkeypatch)
    log = SqlAuditLog(engine)
    log.record([AuditEvent(Action.ACQUIRE, Outcome.SUCCESS, user_id="u", server="s", method="token_exchange",
                           request_id=f"r{i}", ts=NOW + timedelta(seconds=i)) for i in range(3)])
    code, out, err = run(capsys, "audit", "--json", "--limit", "2")
    assert code == 0, err
    assert [e["request_id"] for e in json.loads(out)] == ["r2", "r1"]
    assert [e["request_id"] for e in log.query(limit=2)] == ["r2", "r1"], "GET /v1/audit's order"
    code, _, err = run(capsys, "audit", "--limit", "1001")
    assert code == 2 and "between 1 and 1000" in err
    engine.dispose()  # type: ignore[attr-defined]


def _token_exchange_servers(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"servers": [
        {"name": "tx", "url": "https://tx.example/mcp",
         "auth_broker": {"mode": "token_exchange", "token_endpoint": "https://idp.example/token"}},
        {"name": "obo", "url": "https://obo.example/mcp",
         "auth_broker": {"mode": "entra_obo", "token_endpoint": "https://idp.example/token", "client_id": "c"}},
    ]}))
    return path


def _credential(label: str, via: ObtainedVia) -> Credential:
    return Credential(access_token=Secret(canary(label)), refresh_token=None, obtained_via=via,
                      token_type="Bearer", issued_at=NOW, expires_at=NOW + timedelta(days=3650), scopes=("read",))


def test_cli_credentials_list_json_has_last_used_at(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine, _ = _database(tmp_path, monkeypatch)
    key_line = generate_key_line("k1")
    monkeypatch.setenv(PREFIX + "MASTER_KEYS", key_line)
    monkeypatch.setenv(PREFIX + "SERVERS_FILE", str(_token_exchange_servers(tmp_path / "servers.yaml")))
    settings = load_settings(env_file=None)
    registry = parse_servers(yaml.safe_load((tmp_path / "servers.yaml").read_text()))
    store = CredentialStore(engine, settings.keyring)
    store.put("alice", registry["tx"].key, _credential("list-at", ObtainedVia.TOKEN_EXCHANGE))
    used = NOW + timedelta(minutes=5)
    store.touch("alice", registry["tx"].key, used)
    code, out, err = run(capsys, "credentials", "list", "alice", "--json")
    assert code == 0, err
    rows = {r["server"]: r for r in json.loads(out)}
    assert rows["tx"]["last_used_at"] == used.isoformat()
    assert rows["obo"]["last_used_at"] is None and rows["obo"]["status"] == "not_connected"
    assert set(rows["tx"]) == {"server", "mode", "status", "expires_at", "obtained_via", "scopes", "last_used_at"}
    engine.dispose()  # type: ignore[attr-defined]


def test_removing_an_entra_obo_credential_is_audited_as_entra_obo(engine) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_keyring

    registry = parse_servers(yaml.safe_load(_token_exchange_servers(Path("servers.yaml")).read_text()))
    store = CredentialStore(engine, make_keyring("A"), clock=FakeClock(NOW))
    store.put("alice", registry["obo"].key, _credential("obo-at", ObtainedVia.ENTRA_OBO))
    audit = MemoryAuditSink()
    flow = ConnectFlow(registry, store, oauth=None, states=None, audit=audit,  # type: ignore[arg-type]
                       clock=FakeClock(NOW), callback_url="http://127.0.0.1:8080/v1/connect/callback")
    assert flow.disconnect("alice", "obo") is True
    assert [(e.action, e.method) for e in audit.events] == [(Action.DISCONNECT, "entra_obo")]


# -- 8: errors that say what to do -----------------------------------------------------------------


def test_unknown_server_with_no_servers_file_says_to_set_one() -> None:
    with pytest.raises(UnknownServer, match="no servers are configured .*CREDBROKER_SERVERS_FILE"):
        ServerRegistry().get_server("demo-exchange")
    registry = parse_servers(yaml.safe_load(_token_exchange_servers(Path("servers.yaml")).read_text()))
    with pytest.raises(UnknownServer, match=r"^unknown server \(configured: tx, obo\)$") as info:
        registry.get_server("nope")
    assert "nope" not in info.value.message  # the submitted name is never echoed (issue 12)


def test_servers_check_reports_every_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"servers": [
        {"name": "a", "url": "https://a.example/mcp", "auth_broker": {"mode": "magic"}},
        {"name": "good", "url": "https://g.example/mcp",
         "auth_broker": {"mode": "token_exchange", "token_endpoint": "https://idp.example/token"}},
        {"name": "b"},
        {"name": "good", "url": "https://g2.example/mcp",
         "auth_broker": {"mode": "token_exchange", "token_endpoint": "https://idp.example/token"}},
    ]}))
    code, out, err = run(capsys, "servers", "check", str(path))
    assert code == 2 and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("error: config_error:")]
    assert len(errors) == 3, err
    assert "server 'a'" in errors[0] and "mode" in errors[0]
    assert "server 'b'" in errors[1] and "url" in errors[1]
    assert "server 'good'" in errors[2] and "duplicate" in errors[2]
    assert "3 error(s); 1 server(s) valid" in err


@pytest.mark.parametrize("content", ["", "servers: []\n", "mcpServers:\n  fs: {command: npx}\n"])
def test_servers_check_refuses_a_file_that_configures_nothing(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    code, out, err = run(capsys, "servers", "check", str(path))
    assert code == 2 and "OK" not in out
    assert "no servers" in err


# -- 9: compose requirements are checked by the process, `.ci/run` paths ----------------------------


def test_require_names_every_missing_setting(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFIX + "REQUIRE", "MASTER_KEYS,TRANSPORT_KEY,API_KEYS")
    monkeypatch.setenv(PREFIX + "API_KEYS", "k" * 20)
    monkeypatch.setenv(PREFIX + "TRANSPORT_KEY", "")  # what `${VAR:-}` gives for an unset variable
    code, _, err = run(capsys, "db", "current")
    assert code == 2
    assert "CREDBROKER_MASTER_KEYS, CREDBROKER_TRANSPORT_KEY must be set here" in err
    assert "CREDBROKER_API_KEYS," not in err
    # keygen runs before any key exists: that is what the keys are made with.
    code, out, _ = run(capsys, "keygen")
    assert code == 0 and out.strip()


def test_require_rejects_a_name_that_is_no_setting(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFIX + "REQUIRE", "MASTER_KEY")
    code, _, err = run(capsys, "db", "current")
    assert code == 2 and "CREDBROKER_REQUIRE: not settings: MASTER_KEY" in err


@pytest.mark.parametrize("ci_venv", ["/opt/ci venv", "rel-venv", None])
def test_ci_run_puts_an_existing_venv_path_first(tmp_path: Path, ci_venv: str | None) -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    wanted = [ln for ln in lines if ln.startswith(('VENV="${CI_VENV', 'case "$VENV"', 'export PATH="'))]
    assert len(wanted) == 3
    env = {"PATH": "/usr/bin:/bin"} | ({"CI_VENV": ci_venv} if ci_venv else {})
    script = "\n".join([*wanted, 'printf "%s\\n" "${PATH%%:*}"'])
    first = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           check=True).stdout.strip()
    expected = {"/opt/ci venv": "/opt/ci venv/bin", "rel-venv": f"{tmp_path}/rel-venv/bin",
                None: f"{tmp_path}/.ci-venv/bin"}[ci_venv]
    assert first == expected
