"""docker-compose.yml and the Dockerfile agree with the CLI and the settings (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.settings import PREFIX, SETTING_NAMES
from workers.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
# Services that run the broker's own image, whose command is a credbroker sub-command.
OURS = sorted(name for name, svc in SERVICES.items() if "build" in svc)
SECRET_SETTINGS = ("MASTER_KEYS", "TRANSPORT_KEY", "API_KEYS", "FLOWER_BASIC_AUTH")
REQUIRED = re.compile(r"\$\{[A-Z_]+:\?[^}]+\}")


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


def test_one_image_built_from_the_dockerfile() -> None:
    assert {SERVICES[n]["image"] for n in OURS} == {"credential-broker:latest"}
    assert all(SERVICES[n]["build"] == "." for n in OURS)
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
        if key.startswith(PREFIX):
            assert key[len(PREFIX):] in SETTING_NAMES, f"{name}: {key} is not a setting"


@pytest.mark.parametrize("name", OURS)
def test_broker_services_are_joined_to_redis_and_postgres(name: str) -> None:
    env = _environment(SERVICES[name])
    assert env[PREFIX + "REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    assert env[PREFIX + "REDIS_URL"].endswith("@redis:6379/0")
    assert env[PREFIX + "DATABASE_URL"].startswith("postgresql://credbroker:${POSTGRES_PASSWORD:?")
    assert env[PREFIX + "DATABASE_URL"].endswith("@postgres:5432/credbroker")
    for setting in ("MASTER_KEYS", "TRANSPORT_KEY", "API_KEYS"):
        assert REQUIRED.fullmatch(env[PREFIX + setting]), f"{name}: {setting} must be required, not committed"


def test_no_secret_is_committed() -> None:
    for name, svc in SERVICES.items():
        for key, value in _environment(svc).items():
            if any(key == PREFIX + s for s in SECRET_SETTINGS) or "PASSWORD" in key or key == "REDISCLI_AUTH":
                assert REQUIRED.fullmatch(value), f"{name}: {key} must come from .env or the environment"


def test_flower_requires_authentication() -> None:
    flower = SERVICES["flower"]
    assert REQUIRED.fullmatch(_environment(flower)[PREFIX + "FLOWER_BASIC_AUTH"])
    assert "--insecure-no-auth" not in flower["command"]
    assert all(str(p).startswith("127.0.0.1:") for p in flower.get("ports", [])), "Flower only on loopback"


def test_redis_has_a_password_and_never_evicts() -> None:
    command = SERVICES["redis"]["command"]
    assert command[0] == "redis-server"
    assert REQUIRED.fullmatch(command[command.index("--requirepass") + 1])
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


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
