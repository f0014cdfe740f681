"""The credbroker CLI without services: help, parsing, keygen, servers check, exit
codes, masking, the embedded default's files, and the process supervisor."""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typing import Any
import yaml

from broker.crypto import parse_key, parse_master_keys
from broker.settings import PREFIX
from tests.cluster import wait_for
from workers import cli, cli_procs, embedded
from workers.cli_admin import Progress
from workers.cli_common import mask_header_value
from workers.cli_supervisor import ChildDied, Stopped, Supervisor


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No CREDBROKER_* variable and no .env: each test sets exactly what it needs."""
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command, e.g. ("credentials", "list")."""
    paths: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(command_paths(sub, (*prefix, name)))
    return paths


# -- help -------------------------------------------------------------------------------------


def test_every_design_command_exists() -> None:
    top = {p[0] for p in command_paths(cli.build_parser())}
    assert top == set(cli.COMMANDS)


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("path", command_paths(cli.build_parser()), ids=" ".join)
def test_help_for_every_command(capsys: pytest.CaptureFixture[str], path: tuple[str, ...]) -> None:
    code, out, _ = run(capsys, *path, "--help")
    assert code == 0
    assert f"usage: credbroker {' '.join(path)}" in out
    assert "examples:" in out, "every command's help shows examples"
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 8, "every command's help has a real description"


# -- usage errors exit 2 ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [],
    ["no-such-command"],
    ["resolve", "alice"],
    ["credentials"],
    ["credentials", "list"],
    ["db"],
    ["servers", "check"],
    ["api", "--port", "http"],
    ["api", "--port", "70000"],
    ["up", "--workers", "0"],
    ["worker", "--pool", "gevent"],
    ["worker", "--concurrency", "-1"],
    ["worker", "--loglevel", "loud"],
    ["audit", "--limit", "0"],
    ["resolve", "alice", "github", "--timeout", "-3"],
    ["keygen", "--transport", "--kid", "k1"],
    ["keygen", "--kid", "no spaces"],
    ["rotate-keys", "--batch-size", "0"],
])
def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.strip(), "a usage error says what is wrong"


def test_invalid_user_id_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "credentials", "list", "a/b")
    assert code == 2
    assert err.startswith("error: invalid_request: USER:")


def test_bad_setting_is_a_config_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFIX + "MASTER_KEYS", "k1:not-base64!")
    code, _, err = run(capsys, "credentials", "list", "alice")
    assert code == 2
    assert err.startswith("error: config_error: CREDBROKER_MASTER_KEYS")


def test_runtime_failure_exits_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    monkeypatch.setenv(PREFIX + "DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    code, _, err = run(capsys, "credentials", "list", "alice")
    assert code == 1
    assert err == "error: unavailable: database has no schema yet: run `credbroker db upgrade`\n"


# -- keygen -------------------------------------------------------------------------------------------


def test_keygen_prints_a_master_keys_entry(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keygen")
    assert code == 0 and err == ""
    keys = parse_master_keys(out.strip())
    assert len(keys) == 1 and len(next(iter(keys.values()))) == 32
    code, out2, _ = run(capsys, "keygen")
    assert out2 != out


def test_keygen_with_kid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keygen", "--kid", "2025-06")
    assert code == 0
    assert list(parse_master_keys(out.strip())) == ["2025-06"]


def test_keygen_transport(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keygen", "--transport")
    assert code == 0
    assert ":" not in out
    assert len(parse_key(out.strip(), "transport")) == 32


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_keygen_jwk_prints_a_pair_whose_signatures_the_jwk_verifies(
        capsys: pytest.CaptureFixture[str], tmp_path: Any, alg: str) -> None:
    import json

    from broker.jose import SigningKey, load_private_pem
    from broker.oauth.assertion import client_assertion
    from broker.sandbox.pop import verify_client_assertion

    code, out, _ = run(capsys, "keygen", "--jwk", "--alg", alg)
    assert code == 0
    pem, _, jwks = out.partition("-----END PRIVATE KEY-----\n")
    (jwk,) = json.loads(jwks)["keys"]
    assert "d" not in jwk and jwk["alg"] == alg and jwk["use"] == "sig"
    key = SigningKey.of(load_private_pem((pem + "-----END PRIVATE KEY-----\n").encode(), "out"), kid=jwk["kid"])
    assert key.kid == jwk["kid"]  # the default kid is the key's thumbprint, so servers config can name it
    verify_client_assertion(client_assertion(key, "c", "https://as/token", 1e9), client_id="c", jwk=jwk,
                            audiences={"https://as/token"}, now=1e9, seen={})
    path = tmp_path / "client.pem"
    code, out, _ = run(capsys, "keygen", "--jwk", "--kid", "k-2026", "--out", str(path))
    assert code == 0 and "PRIVATE" not in out and json.loads(out)["keys"][0]["kid"] == "k-2026"
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----") and path.stat().st_mode & 0o777 == 0o600
    code, _, err = run(capsys, "keygen", "--jwk", "--out", str(path))  # never overwrites a key
    assert code == 2 and "cannot create" in err
    code, _, err = run(capsys, "keygen", "--jwk", "--transport")
    assert code == 2


# -- servers check ---------------------------------------------------------------------------------------

GOOD = {"servers": [
    {"name": "github", "url": "https://mcp.github.example/mcp",
     "auth_broker": {"mode": "oauth_connect", "token_endpoint": "https://gh.example/token",
                     "authorization_endpoint": "https://gh.example/authorize", "client_id": "abc",
                     "client_secret": "cbtest-servers-check-secret-value"}},
    {"name": "jira", "url": "https://jira.example/mcp",
     "auth_broker": {"mode": "token_exchange", "token_endpoint": "https://idp.example/token"}},
]}


def test_servers_check_good_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from broker.servers import server_key

    path = tmp_path / "servers.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    code, out, err = run(capsys, "servers", "check", str(path))
    assert code == 0, err
    assert "github" in out and "oauth_connect" in out and server_key("github", GOOD["servers"][0]["url"])[:12] in out
    assert "jira" in out and "token_exchange" in out
    assert "2 server(s), OK" in out
    assert "cbtest-servers-check-secret-value" not in out + err


def test_servers_check_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import json

    path = tmp_path / "servers.json"
    path.write_text(json.dumps(GOOD))
    code, out, _ = run(capsys, "servers", "check", str(path), "--json")
    assert code == 0
    assert [(s["name"], s["mode"], len(s["key"])) for s in json.loads(out)] == [
        ("github", "oauth_connect", 64), ("jira", "token_exchange", 64)]


@pytest.mark.parametrize("content, reason", [
    ("servers: [{name: x}]", "url"),
    ("servers:\n  - name: a\n    url: https://a.example/mcp\n    auth_broker: {mode: magic}", "mode"),
    ("{not json", "invalid"),
])
def test_servers_check_bad_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, out, err = run(capsys, "servers", "check", str(path))
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: config_error: servers file {str(path)!r}")
    assert reason in err


def test_servers_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "servers", "check", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "No such file" in err


# -- masking ---------------------------------------------------------------------------------------------


def test_mask_header_value() -> None:
    assert mask_header_value("Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig") == "Bearer eyJh…(redacted)"
    assert mask_header_value("token-without-scheme-1234567890") == "toke…(redacted)"
    assert mask_header_value("Bearer short") == "Bearer …(redacted)"
    secret = "cbtest-mask-0123456789abcdef"
    assert secret not in mask_header_value(f"Bearer {secret}")


# -- worker, beat, flower commands -------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_queues_match_the_celery_app_and_resolves_sort_first() -> None:
    from workers.celery_app import QUEUES, app

    assert cli_procs.QUEUES == QUEUES
    # The transport asks Redis for queues in sorted name order (see celery_app).
    assert app.conf.broker_transport_options["queue_order_strategy"] == "sorted"
    assert sorted(QUEUES) == list(QUEUES)


def test_worker_argv() -> None:
    from broker.settings import load_settings

    argv = cli_procs.worker_argv(parse("worker", "-c", "3", "--pool", "threads"), load_settings({}, env_file=None))
    assert argv[:5] == [sys.executable, "-m", "celery", "-A", "workers.celery_app"]
    assert argv[5] == "worker"
    assert {"--concurrency=3", "--pool=threads", "--queues=credbroker,credbroker.refresh",
            "--loglevel=INFO"} <= set(argv)
    settings = load_settings({}, env_file=None)
    assert "--queues=credbroker.refresh" in cli_procs.worker_argv(parse("worker", "--queues", "refresh"), settings)
    # the order given does not matter: resolves are always served first
    both = cli_procs.worker_argv(parse("worker", "-Q", "refresh,resolve"), settings)
    assert "--queues=credbroker,credbroker.refresh" in both


def test_worker_rejects_unknown_queues(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("worker", "--queues", "celery")


def test_beat_argv_uses_the_state_dir() -> None:
    from broker.settings import load_settings

    s = load_settings({PREFIX + "STATE_DIR": "/var/lib/cb"}, env_file=None)
    argv = cli_procs.beat_argv(parse("beat"), s)
    assert argv[5] == "beat" and "--schedule=/var/lib/cb/celerybeat-schedule" in argv


def test_flower_refuses_to_start_without_auth(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "flower")
    assert code == 2
    assert err.startswith("error: config_error: Flower needs authentication")


def test_flower_password_goes_in_the_environment_not_argv() -> None:
    from broker.settings import load_settings

    password = "cbtest-flower-password-1234"
    s = load_settings({PREFIX + "FLOWER_BASIC_AUTH": f"ops:{password}"}, env_file=None)
    argv, env = cli_procs.flower_command(parse("flower", "--port", "5600"), s, {"PATH": "/bin"})
    assert env["FLOWER_BASIC_AUTH"] == f"ops:{password}"
    assert not any(password in a for a in argv)
    assert "--port=5600" in argv and "--address=127.0.0.1" in argv


def test_flower_insecure_no_auth_is_explicit() -> None:
    from broker.settings import load_settings

    argv, env = cli_procs.flower_command(parse("flower", "--insecure-no-auth"), load_settings({}, env_file=None), {})
    assert "FLOWER_BASIC_AUTH" not in env
    assert argv[5] == "flower"


# -- rotate-keys progress ------------------------------------------------------------------------------------


class _Out:
    def __init__(self, tty: bool) -> None:
        self.text = ""
        self.tty = tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


def test_progress_bar_lines() -> None:
    now = [0.0]
    out = _Out(tty=False)
    bar = Progress(200, out, width=10, clock=lambda: now[0])  # type: ignore[arg-type]
    now[0] = 2.0
    bar.advance(100)
    assert out.text == "[#####.....] 100/200  50.0% 50 records/s\n"
    now[0] = 4.0
    bar.advance(100)
    assert out.text.splitlines()[-1] == "[##########] 200/200 100.0% 50 records/s"


def test_progress_bar_redraws_on_a_terminal() -> None:
    out = _Out(tty=True)
    bar = Progress(10, out, width=10)  # type: ignore[arg-type]
    bar.advance(5)
    bar.advance(5)
    bar.finish()
    assert out.text.count("\r") == 2 and out.text.endswith("\n")


# -- the embedded default's files -------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_embedded_keys_are_generated_once_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    first = embedded.embedded_keys({}, folder)
    assert set(first) == {PREFIX + "MASTER_KEYS", PREFIX + "TRANSPORT_KEY"}
    parse_master_keys(first[PREFIX + "MASTER_KEYS"])
    parse_key(first[PREFIX + "TRANSPORT_KEY"], "transport")
    assert mode(folder) == 0o700
    assert mode(folder / "master.key") == 0o600 and mode(folder / "transport.key") == 0o600
    assert embedded.embedded_keys({}, folder) == first, "reused on the next run"


def test_embedded_keys_tighten_loose_permissions(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    embedded.embedded_keys({}, folder)
    folder.chmod(0o755)
    (folder / "master.key").chmod(0o644)
    embedded.embedded_keys({}, folder)
    assert mode(folder) == 0o700 and mode(folder / "master.key") == 0o600


def test_no_keys_generated_when_a_master_key_is_configured(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    configured = {PREFIX + "MASTER_KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode()}
    assert embedded.embedded_keys(configured, folder) == {}
    assert not (folder / "master.key").exists()


def test_a_broken_key_file_is_a_config_error(tmp_path: Path) -> None:
    from broker.errors import ConfigError

    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    (folder / "master.key").write_text("garbage\n")
    with pytest.raises(ConfigError, match="master.key"):
        embedded.embedded_keys({}, folder)


def test_prepare_warns_loudly_about_development_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    result = embedded.prepare({PREFIX + "STATE_DIR": str(tmp_path / "st")}, start_redis=False)
    assert result.dev_keys and result.folder == tmp_path / "st"
    assert any("DEVELOPMENT ONLY" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_configured_reads_env_file_under_the_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"{PREFIX}REDIS_URL=redis://from-file:6379/0\n{PREFIX}LOG_LEVEL=DEBUG\nOTHER=1\n")
    values = embedded.configured({PREFIX + "LOG_LEVEL": "ERROR", PREFIX + "EMPTY": ""}, env_file)
    assert values == {PREFIX + "REDIS_URL": "redis://from-file:6379/0", PREFIX + "LOG_LEVEL": "ERROR"}


# -- the supervisor ------------------------------------------------------------------------------------------------

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
# A child that starts a grandchild in its own process group and ignores SIGTERM.
STUBBORN = [sys.executable, "-c",
            "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print(p.pid, flush=True); time.sleep(60)"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_supervisor_stops_children_and_sweeps_their_groups() -> None:
    out = io.StringIO()
    sup = Supervisor(out=out, stop_timeout=1.0)
    try:
        plain = sup.spawn("plain", SLEEPER, os.environ)
        stubborn = sup.spawn("stubborn", STUBBORN, os.environ)
        grandchild = int(sup.wait_for(lambda: stubborn.lines and stubborn.lines[0], 20, "the grandchild"))
        sup.wait_for(lambda: plain.lines, 20, "the sleeper")
    finally:
        sup.stop()
        sup.close()
    assert not alive(plain.pid) and not alive(stubborn.pid)
    wait_for(lambda: not alive(grandchild), 10, what="the grandchild to die (SIGKILL is asynchronous)")
    text = out.getvalue()
    assert "plain     | up" in text and "stubborn did not stop within 1s: killing it" in text


def test_supervisor_reports_a_child_that_dies() -> None:
    sup = Supervisor(out=io.StringIO())
    sup.install_signal_handlers()
    try:
        sup.spawn("ok", SLEEPER, os.environ)
        sup.spawn("crash", [sys.executable, "-c", "import sys; sys.exit(3)"], os.environ)
        with pytest.raises(ChildDied, match="crash exited with code 3"):
            sup.run()
    finally:
        sup.stop()
        sup.close()


def test_supervisor_stops_on_sigterm() -> None:
    sup = Supervisor(out=io.StringIO())
    sup.install_signal_handlers()
    try:
        child = sup.spawn("ok", SLEEPER, os.environ)
        sup.wait_for(lambda: child.lines, 20, "the child")
        os.kill(os.getpid(), signal.SIGTERM)
        started = time.monotonic()
        with pytest.raises(Stopped, match="SIGTERM"):
            sup.run()
        assert time.monotonic() - started < 5
    finally:
        sup.stop()
        sup.close()
    assert not alive(child.pid)
    assert signal.getsignal(signal.SIGTERM) is not None


def test_supervisor_wait_for_times_out() -> None:
    sup = Supervisor(out=io.StringIO())
    try:
        with pytest.raises(TimeoutError, match="waiting for nothing"):
            sup.wait_for(lambda: False, 0.3, "nothing", interval=0.05)
    finally:
        sup.close()


# -- commands join a running `up` in the same folder ---------------------------------------------------------------


def test_commands_use_the_running_up_session(tmp_path: Path) -> None:
    from workers.cli_common import settings

    folder = embedded.ensure_state_dir(tmp_path / ".credbroker")
    session = {PREFIX + "REDIS_URL": "redis://:pw@127.0.0.1:7001/0", PREFIX + "PUBLIC_URL": "http://127.0.0.1:9000"}
    path = embedded.write_session(folder, session)
    assert mode(path) == 0o600
    assert embedded.read_session({}) == (os.getpid(), session)
    assert settings().redis_url == "redis://:pw@127.0.0.1:7001/0"
    embedded.remove_session(folder)
    assert embedded.read_session({}) is None
    assert settings().redis_url == "redis://127.0.0.1:6379/0"


def test_a_session_left_by_a_killed_up_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = embedded.ensure_state_dir(tmp_path / ".credbroker")
    embedded.write_session(folder, {PREFIX + "REDIS_URL": "redis://127.0.0.1:7001/0"}, pid=dead.pid)
    assert embedded.read_session({}) is None
