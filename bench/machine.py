"""A short description of the machine and the software under test."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import redis
from sqlalchemy import text

from broker.db import make_engine

__all__ = ["describe", "pg_version"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _cores() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{usable} usable ({os.cpu_count()} online)"


def pg_version(admin_url: str) -> str | None:
    try:
        engine = make_engine(admin_url, pool_size=1)
        with engine.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar())
        engine.dispose()
        return version
    except Exception:  # noqa: BLE001 - absent or unreachable: reported as such
        return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def describe(redis_url: str, redis_started: bool, pg: str | None) -> list[tuple[str, str]]:
    info = redis.Redis.from_url(redis_url).info("server")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("CPU", _cpu_model()),
        ("cores", _cores()),
        ("RAM", _ram()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("Redis", f"{info.get('redis_version')}" + (" (private instance started by the bench)" if redis_started
                                                     else " (already running)")),
        ("PostgreSQL", pg or "not reachable"),
        ("libraries", ", ".join(f"{p} {_version(p)}" for p in
                                ("celery", "kombu", "redis", "httpx", "uvicorn", "starlette", "sqlalchemy",
                                 "psycopg", "cryptography"))),
        ("load average at start", load),
    ]
