"""The embedded default: what ``credbroker up`` fills in when nothing is configured.

On a fresh machine ``up`` must work with no settings at all. The gaps it
fills, and only those:

- no master key: a master key and a transport key are generated once into the
  state folder (``CREDBROKER_STATE_DIR``, default ``.credbroker/``; folder 0700,
  files 0600) and reused on every later run, with a loud warning that this is
  for development only;
- nothing answers at ``REDIS_URL`` (a loopback URL): a private ``redis-server``
  on a free loopback port, without persistence, password-protected, its files
  in the state folder.

The result is a set of ``CREDBROKER_*`` variables that the child processes
receive, so every process of the tree reads the same settings.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import redis

from broker.crypto import generate_key_line, parse_key, parse_master_keys
from broker.errors import ConfigError, ServiceUnavailable
from broker.server_config import is_loopback
from broker.settings import PREFIX, read_env_file

__all__ = [
    "Embedded",
    "PrivateRedis",
    "configured",
    "state_dir",
    "ensure_state_dir",
    "secret_file",
    "embedded_keys",
    "redis_answers",
    "redis_reachable",
    "start_private_redis",
    "prepare",
    "write_session",
    "read_session",
    "remove_session",
    "session_environment",
    "DEV_WARNING",
]

log = logging.getLogger(__name__)

MASTER_KEY_FILE = "master.key"
# While ``up`` runs, the settings it gave its children, so that other commands
# run in the same folder (``credentials list``, ``resolve``...) reach the same
# database, keys and Redis.
SESSION_FILE = "session.env"
SESSION_PID = PREFIX + "UP_PID"  # not a setting: load_settings ignores it
TRANSPORT_KEY_FILE = "transport.key"
# A kid that says where the key came from when it shows up in a rotation report.
DEV_KID = "dev"

DEV_WARNING = """\
********************************************************************************
DEVELOPMENT ONLY: credbroker generated its encryption keys into {where}
Anyone who can read that folder can decrypt every stored credential. For
anything real, set CREDBROKER_MASTER_KEYS (see `credbroker keygen`) and
CREDBROKER_TRANSPORT_KEY, and keep them in a secret store.
********************************************************************************"""


def configured(environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")) -> dict[str, str]:
    """The ``CREDBROKER_*`` values in effect: ``.env`` under the environment, empty ones dropped."""
    merged: dict[str, str] = {}
    if env_file is not None:
        merged.update(read_env_file(env_file))
    merged.update(os.environ if environ is None else environ)
    return {k: v for k, v in merged.items() if k.startswith(PREFIX) and v != ""}


def state_dir(values: Mapping[str, str]) -> Path:
    return Path(values.get(PREFIX + "STATE_DIR") or ".credbroker")


def ensure_state_dir(path: Path) -> Path:
    """Create the state folder owner-only (0700), tightening an existing one."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def secret_file(path: Path, make: Callable[[], str], check: Callable[[str], object] | None = None) -> tuple[str, bool]:
    """Read a one-line secret file, creating it (0600, exclusively) on first use.

    Returns (value, created). Two processes racing to create it agree on one
    value: the loser of ``O_EXCL`` reads the winner's.
    """
    ensure_state_dir(path.parent)
    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(make() + "\n")
        created = True
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others; restricting it to its owner (0600)", path)
        path.chmod(0o600)
    value = path.read_text(encoding="utf-8").strip()
    if check is not None:
        try:
            check(value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}; delete the file to generate a new one") from None
    return value, created


def _new_transport_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def embedded_keys(values: Mapping[str, str], folder: Path) -> dict[str, str]:
    """``MASTER_KEYS`` and ``TRANSPORT_KEY`` from the state folder, when no master key is set.

    With a configured master key nothing is generated: a missing transport key
    is then derived from it, as every client that has the master key expects.
    """
    if values.get(PREFIX + "MASTER_KEYS"):
        return {}
    master, _ = secret_file(folder / MASTER_KEY_FILE, lambda: generate_key_line(DEV_KID),
                            lambda v: parse_master_keys(v, "master key"))
    out = {PREFIX + "MASTER_KEYS": master}
    if not values.get(PREFIX + "TRANSPORT_KEY"):
        transport, _ = secret_file(folder / TRANSPORT_KEY_FILE, _new_transport_key,
                                   lambda v: parse_key(v, "transport key"))
        out[PREFIX + "TRANSPORT_KEY"] = transport
    return out


# -- Redis -------------------------------------------------------------------------


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False
    finally:
        client.close()


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    """True when Redis answers at ``url``, False when nothing does.

    A Redis that answers but refuses (a database index it does not have, a
    missing or wrong password) is a configuration error, raised as one:
    starting a private Redis beside it would hide the mistake.
    """
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError:
        raise ConfigError(f"{PREFIX}REDIS_URL: not a valid Redis URL") from None
    where = _where(url)
    try:
        return bool(client.ping())
    except redis.AuthenticationError:  # a subclass of ConnectionError: test it first
        raise ConfigError(f"{PREFIX}REDIS_URL: Redis at {where} answers but refuses the password "
                          "(missing or wrong): put it in the URL, redis://:PASSWORD@host:port/db") from None
    except redis.ResponseError as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        if "DB index" in reason:
            db = urlsplit(url).path.lstrip("/") or "0"
            raise ConfigError(f"{PREFIX}REDIS_URL: Redis at {where} answers but has no database {db} "
                              f"({reason}; a default Redis has databases 0-15)") from None
        raise ConfigError(f"{PREFIX}REDIS_URL: Redis at {where} answers but refuses: {reason}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def _where(url: str) -> str:
    """host:port of a Redis URL, without its password."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 6379}"
    except ValueError:
        return "CREDBROKER_REDIS_URL"


def _loopback_url(url: str) -> bool:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback(host)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivateRedis:
    """A ``redis-server`` this process started; ``url`` carries its password."""

    process: subprocess.Popen[bytes]
    port: int
    url: str = field(repr=False)  # holds the password
    folder: Path = Path(".credbroker")

    @property
    def display_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_private_redis(folder: Path, *, popen: Callable[..., subprocess.Popen[bytes]] | None = None,
                        timeout: float = 15.0, attempts: int = 3) -> PrivateRedis:
    """Start ``redis-server`` on a free loopback port, without persistence, and wait for it.

    The password lives in a 0600 config file, not on the command line, where
    any local user could read it in the process list.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable(
            "nothing answers at CREDBROKER_REDIS_URL and redis-server is not installed: "
            "install Redis or set CREDBROKER_REDIS_URL"
        )
    data = ensure_state_dir(folder / "redis")
    password = secrets.token_hex(24)
    config = data / "redis.conf"
    config.unlink(missing_ok=True)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(f"requirepass {password}\nprotected-mode yes\n")
    start = popen or subprocess.Popen
    last = "did not start"
    for _ in range(attempts):
        port = _free_port()  # a race with another binder ends in a retry below
        argv = [binary, str(config), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data.resolve()),
                "--logfile", str((data / "redis.log").resolve())]
        proc = start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
        url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if redis_answers(url, timeout=0.5):
                return PrivateRedis(proc, port, url, data)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        last = f"exited with code {proc.returncode}; see {data / 'redis.log'}"
    raise ServiceUnavailable(f"private redis-server {last}")


# -- putting it together -------------------------------------------------------------


@dataclass
class Embedded:
    """What ``up`` filled in: the variables for the children and what to tell the user."""

    env: dict[str, str] = field(default_factory=dict, repr=False)  # holds keys
    folder: Path = Path(".credbroker")
    dev_keys: bool = False
    redis: PrivateRedis | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.redis is None or self.redis.process.poll() is not None:
            return
        self.redis.process.terminate()
        try:
            self.redis.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.redis.process.kill()
            self.redis.process.wait()


def prepare(values: Mapping[str, str], *, start_redis: bool = True) -> Embedded:
    """Fill the gaps in ``values`` (the configured ``CREDBROKER_*`` variables)."""
    url = values.get(PREFIX + "REDIS_URL") or "redis://127.0.0.1:6379/0"
    # First: a Redis that answers but refuses is a mistake to report before anything is generated.
    reachable = redis_reachable(url) if start_redis else True
    folder = ensure_state_dir(state_dir(values))
    result = Embedded(folder=folder)
    keys = embedded_keys(values, folder)
    if keys:
        result.env.update(keys)
        result.dev_keys = True
        for line in DEV_WARNING.format(where=f"{folder.resolve()}/").splitlines():
            log.warning("%s", line.rstrip())
    if not reachable:
        if not _loopback_url(url):
            raise ServiceUnavailable("nothing answers at CREDBROKER_REDIS_URL (a remote Redis): is it down?")
        result.redis = start_private_redis(folder)
        result.env[PREFIX + "REDIS_URL"] = result.redis.url
        log.warning("nothing answers at CREDBROKER_REDIS_URL: started a private redis-server on %s "
                    "(no persistence; files in %s); it stops with credbroker",
                    result.redis.display_url, result.redis.folder)
    return result


# -- the running session ---------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_session(folder: Path, values: Mapping[str, str], pid: int | None = None) -> Path:
    """Record this ``up``'s settings (0600: they hold keys) for commands run beside it."""
    path = folder / SESSION_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(f"# written by credbroker up (pid {pid or os.getpid()}); removed when it stops\n")
        # Prefixed, so `set -a; . session.env` in a shell sets nothing but CREDBROKER_* variables.
        out.write(f"{SESSION_PID}={pid or os.getpid()}\n")
        for key, value in sorted(values.items()):
            out.write(f"{key}={value}\n")
    return path


def read_session(values: Mapping[str, str]) -> tuple[int, dict[str, str]] | None:
    """The running ``up``'s pid and settings in this folder, if one is running."""
    path = state_dir(values) / SESSION_FILE
    try:
        data = read_env_file(path)
        pid = int(data.pop(SESSION_PID))
    except (ConfigError, KeyError, ValueError, OSError):
        return None
    if not _alive(pid):
        return None  # left behind by an up that was killed
    return pid, {k: v for k, v in data.items() if k.startswith(PREFIX)}


def session_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment joined to a ``credbroker up`` running in this folder.

    While ``up`` runs, the settings it filled in for its children (generated
    keys, a private Redis, the demo's servers and API key) apply to the
    commands and ``BrokerClient()`` run in the same folder too, as they do to
    those children. With no ``up`` running this is the environment as is.
    """
    base = dict(os.environ if environ is None else environ)
    session = read_session(configured(base))
    return {**base, **(session[1] if session else {})}


def remove_session(folder: Path) -> None:
    (folder / SESSION_FILE).unlink(missing_ok=True)
