"""docker-compose.yml and the Dockerfile agree with the CLI and the settings (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.settings import PREFIX, SETTING_NAMES
from workers.cli import build_parser
from workers.cli_common import REQUIRE_VARIABLE

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
IMAGE = "credential-broker:latest"
# Services that run the broker's own image, whose command is a credbroker sub-command.
OURS = sorted(name for name, svc in SERVICES.items() if svc.get("image") == IMAGE)
SECRET_SETTINGS = ("MASTER_KEYS", "TRANSPORT_KEY", "API_KEYS", "FLOWER_BASIC_AUTH")
# From .env or the environment, never committed; and never `${VAR:?}`, which Compose
# checks for every command, so `docker compose run --rm api keygen` could not run
# before the keys exist.
FROM_ENV = re.compile(r"\$\{([A-Z_]+):-\}")


def test_the_services_exist() -> None:
    assert {"redis", "postgres", "api", "worker", "beat", "flower"} <= set(SERVICES)
    assert {"api", "worker", "beat", "flower"} <= set(OURS)


@pytest.mark.parametrize("name", OURS)
def test_commands_are_real_credbroker_subcommands(name: str) -> None:
    command = SERVICES[name]["command"]
    assert isinstance(command, list) and command, "exec form, so no shell reinterprets it"
    args = build_parser().parse_args(command)  # exits 2 (fails the test) on anything unknown
    assert callable(args.handler)


def test_each_role_runs_its_command() -> None:
    roles = ("api", "worker", "beat", "flower")
    assert tuple(SERVICES[n]["command"][0] for n in roles) == roles


def test_one_image_built_once_from_the_dockerfile() -> None:
    assert set(OURS) == {"migrate", "api", "worker", "beat", "flower"}
    builders = [n for n in OURS if "build" in SERVICES[n]]
    assert builders == ["api"], "one service builds the image, so it is built once"
    assert SERVICES["api"]["build"] == "."
    # The others never try to pull an image only this project builds.
    assert all(SERVICES[n]["pull_policy"] == "never" for n in OURS if n != "api")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "pip install ." in dockerfile
    assert 'ENTRYPOINT ["credbroker"]' in dockerfile
    assert "COPY . " not in dockerfile, "copying the whole folder would bake .env into the image"


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_credbroker_variable_is_a_real_setting(name: str) -> None:
    for key in _environment(SERVICES[name]):
        if key.startswith(PREFIX) and key != REQUIRE_VARIABLE:
            assert key[len(PREFIX):] in SETTING_NAMES, f"{name}: {key} is not a setting"


@pytest.mark.parametrize("name", OURS)
def test_broker_services_are_joined_to_redis_and_postgres(name: str) -> None:
    env = _environment(SERVICES[name])
    assert env[PREFIX + "REDIS_URL"] == "redis://:${REDIS_PASSWORD:-}@redis:6379/0"
    assert env[PREFIX + "DATABASE_URL"] == "postgresql://credbroker:${POSTGRES_PASSWORD:-}@postgres:5432/credbroker"
    for setting in ("MASTER_KEYS", "TRANSPORT_KEY", "API_KEYS"):
        assert FROM_ENV.fullmatch(env[PREFIX + setting]), f"{name}: {setting} must come from .env, not the file"


def test_no_variable_is_required_at_interpolation_so_keygen_runs_first() -> None:
    assert ":?" not in re.sub(r"(?m)^\s*#.*$", "", (ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("name", ["api", "worker", "beat", "flower"])
def test_services_refuse_to_start_without_their_secrets(name: str) -> None:
    required = _environment(SERVICES[name])[REQUIRE_VARIABLE].split(",")
    assert {"MASTER_KEYS", "TRANSPORT_KEY", "API_KEYS"} <= set(required)
    assert all(r in SETTING_NAMES for r in required)
    if name == "flower":
        assert "FLOWER_BASIC_AUTH" in required
    assert _environment(SERVICES["migrate"])[REQUIRE_VARIABLE] == "", "`run api keygen` starts migrate first"


def test_no_secret_is_committed() -> None:
    for name, svc in SERVICES.items():
        for key, value in _environment(svc).items():
            if any(key == PREFIX + s for s in SECRET_SETTINGS) or "PASSWORD" in key or key == "REDISCLI_AUTH":
                assert FROM_ENV.fullmatch(value), f"{name}: {key} must come from .env or the environment"


def test_flower_requires_authentication() -> None:
    flower = SERVICES["flower"]
    assert FROM_ENV.fullmatch(_environment(flower)[PREFIX + "FLOWER_BASIC_AUTH"])
    assert "--insecure-no-auth" not in flower["command"]
    assert all(str(p).startswith("127.0.0.1:") for p in flower.get("ports", [])), "Flower only on loopback"


def test_redis_has_a_password_not_on_a_command_line_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    shell, flag, script = redis["command"]
    assert (shell, flag) == ("sh", "-c")
    lines = [ln.strip() for ln in script.strip().splitlines()]
    # Refuses to start without a password; writes it to an owner-only file; the server reads the file.
    assert lines[0].startswith('test -n "$$REDIS_PASSWORD" ||') and "exit 1" in lines[0]
    assert "umask 077" in lines
    assert "printf 'requirepass %s\\n' \"$$REDIS_PASSWORD\" > /tmp/redis.conf" in lines
    exec_line = lines[-1].split()
    assert exec_line[:4] == ["exec", "docker-entrypoint.sh", "redis-server", "/tmp/redis.conf"]
    assert not any("PASSWORD" in word for word in exec_line), "no password on redis-server's command line"
    assert exec_line[exec_line.index("--maxmemory-policy") + 1] == "noeviction"
    assert _environment(redis)["REDISCLI_AUTH"] == "${REDIS_PASSWORD:-}", "the health check reads it from there"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_workers_scale() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert "%h" in " ".join(worker["command"]), "unique node names per container"


@pytest.mark.parametrize("name", ["redis", "postgres", "api", "worker", "beat", "flower"])
def test_health_checks(name: str) -> None:
    assert SERVICES[name]["healthcheck"]["test"]


def test_broker_services_wait_for_healthy_services_and_the_schema() -> None:
    assert SERVICES["migrate"]["command"] == ["db", "upgrade"]
    for name in ("api", "worker", "beat", "flower"):
        deps = SERVICES[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"
