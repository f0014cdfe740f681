"""Row 5: the beat's due scan over growing stores with the same 1,000 due.

The store holds three kinds of rows, as a long-running deployment does:

- due: past the refresh point and used recently (the 1,000 the scan must find);
- active: used recently, refresh point still ahead;
- idle: not used within ``RECENT_USE_SECONDS`` — their last refresh point
  lies in the past for good, since the beat renews only what is in use.

Rows are written in bulk with ``insert(credentials)`` executemany and fake
ciphertext; the dataset grows 10k -> 100k -> 1M in place and each size is
scanned several times after one warm-up scan.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, insert, select, text

from broker.crypto import Keyring
from broker.db import credentials as T
from broker.db import make_engine
from broker.migrate import upgrade
from broker.store import CredentialStore

from .report import Report, ms
from .stats import median

__all__ = ["run_scan", "RECENT"]

RECENT = timedelta(days=1)  # RECENT_USE_SECONDS default
_BATCH = 20_000
_SERVER_KEY = "b" * 64
_STATUSES = ("connected", "degraded")
_CIPHERTEXT = b"\x01" * 48  # fake: the scan never decrypts


def _rows(start: int, count: int, now: datetime, due: int, idle_share: float, rnd: random.Random) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + count):
        if i < due:
            refresh_at = now - timedelta(seconds=rnd.uniform(1, 300))
            last_used = now - timedelta(seconds=rnd.uniform(0, 3600))
        elif rnd.random() < idle_share:
            last_used = now - timedelta(days=rnd.uniform(2, 90))
            refresh_at = last_used + RECENT + timedelta(seconds=rnd.uniform(0, 3600))
        else:
            last_used = now - timedelta(seconds=rnd.uniform(0, 3600))
            refresh_at = now + timedelta(seconds=rnd.uniform(60, 3600))
        # Only what the scan reads; nullable columns are left out (NULL) to keep the build fast.
        rows.append({
            "user_id": f"scan-{i:08d}", "server_key": _SERVER_KEY, "ciphertext": _CIPHERTEXT, "key_id": "bench",
            "status": "connected", "obtained_via": "token_exchange", "token_type": "Bearer", "scopes": "[]",
            "refresh_at": refresh_at, "last_used_at": last_used, "version": 1,
        })
    return rows


# created_at and updated_at by the database: converting two more datetimes per row in
# Python would double the time the 1M build takes, and the scan never reads them.
_INSERT = insert(T).values(created_at=func.current_timestamp(), updated_at=func.current_timestamp())


def _insert(engine: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for i in range(0, len(rows), _BATCH):
            conn.execute(_INSERT, rows[i:i + _BATCH])


def _bounded_due(engine: Any, now: datetime, used_since: datetime, limit: int) -> list[Any]:
    """The proposed variant: refresh points older than the recent-use window are skipped."""
    stmt = (select(T.c.user_id, T.c.server_key)
            .where(and_(T.c.refresh_at <= now, T.c.refresh_at >= used_since, T.c.last_used_at >= used_since,
                        T.c.status.in_(_STATUSES)))
            .order_by(T.c.refresh_at).limit(limit))
    with engine.connect() as conn:
        return list(conn.execute(stmt))


def _timed(fn: Any, runs: int, expect: int) -> float:
    fn()  # warm-up: the beat scans every few seconds, so its pages are warm
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        found = fn()
        times.append(time.perf_counter() - t0)
        if len(found) != expect:
            raise RuntimeError(f"due scan found {len(found)} rows, expected {expect}")
    return median(times)


class Dataset:
    """One database's growing dataset; ``grow_to`` adds rows in place."""

    def __init__(self, url: str, due: int, idle_share: float, now: datetime, analyze: bool) -> None:
        self.url = url
        self.engine = make_engine(url)
        upgrade(self.engine)
        self.due = due
        self.idle_share = idle_share
        self.now = now
        self.analyze = analyze  # PostgreSQL: what autovacuum would have done by then
        self.rnd = random.Random(6)
        self.stored = 0
        self.build_seconds = 0.0

    def grow_to(self, size: int) -> None:
        t0 = time.perf_counter()
        while self.stored < size:
            count = min(_BATCH * 5, size - self.stored)
            _insert(self.engine, _rows(self.stored, count, self.now, self.due, self.idle_share, self.rnd))
            self.stored += count
        if self.analyze:
            with self.engine.begin() as conn:
                conn.execute(text("ANALYZE credentials"))
        self.build_seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.engine.dispose()


class RemoteBuilder:
    """A Dataset grown by a child process, so two databases build on two cores at once."""

    def __init__(self, url: str, due: int, idle_share: float, now: datetime, analyze: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scan", url, str(due), str(idle_share), now.isoformat(), str(int(analyze))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent))
        self.build_seconds = 0.0

    def start(self, size: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{size}\n".encode())
        self.proc.stdin.flush()

    def wait(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().split()
        if not line or line[0] != "ok":
            raise RuntimeError("the dataset builder failed")
        self.build_seconds = float(line[1])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _builder_main(argv: list[str]) -> int:
    url, due, idle_share, now, analyze = argv
    data = Dataset(url, int(due), float(idle_share), datetime.fromisoformat(now), analyze == "1")
    for line in sys.stdin:
        data.grow_to(int(line))
        print(f"ok {data.build_seconds:.3f}", flush=True)
    data.close()
    return 0


def _scan_times(url: str, now: datetime, due: int, runs: int) -> tuple[float, float]:
    engine = make_engine(url)
    store = CredentialStore(engine, Keyring((("bench", os.urandom(32)),)))  # due() never decrypts
    since = now - RECENT
    try:
        return (_timed(lambda: store.due(now, used_since=since, limit=10_000), runs, due),
                _timed(lambda: _bounded_due(engine, now, since, 10_000), runs, due))
    finally:
        engine.dispose()


def _report(report: Report, label: str, sizes: list[int], due: int, runs: int, times: dict[int, tuple[float, float]],
            build_seconds: float, idle_share: float) -> None:
    small, big = sizes[-2], sizes[-1]
    for size in sizes:
        last = size == big
        report.add("5", f"due scan, {label}, {size:,} stored / {due:,} due", ms(times[size][0]),
                   f"{small:,} stored: {ms(times[small][0])}" if last else "",
                   f"≤ 2x the {small:,} scan" if last else "",
                   times[big][0] <= 2 * times[small][0] if last else None)
    report.note(f"Row 5 ({label}): median of {runs} scans per size after one warm-up; "
                f"{int(idle_share * 100)}% of the non-due rows idle, the rest active; dataset built in place "
                f"in {build_seconds:.0f} s. Same data, scan bounded below by the recent-use window "
                f"(`refresh_at >= now - RECENT_USE_SECONDS`): "
                + ", ".join(f"{s:,}: {ms(times[s][1])}" for s in sizes) + ".")


def pg_scratch_database(admin_url: str) -> tuple[str, Any]:
    """A throwaway PostgreSQL database; returns its URL and a drop function."""
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT", pool_size=1)
    name = f"credbroker_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def run_scan(report: Report, workdir: Any, *, sizes: list[int], due: int, runs: int, pg_admin_url: str | None,
             idle_share: float = 0.5) -> None:
    """SQLite, and PostgreSQL when given: the two datasets grow at the same time in two
    processes; scans run only once both builds are done, one database at a time."""
    now = datetime.now(UTC)
    sqlite_url = f"sqlite:///{workdir / 'scan.db'}"
    local = Dataset(sqlite_url, due, idle_share, now, analyze=False)
    remote: RemoteBuilder | None = None
    drop = None
    pg_url = ""
    if pg_admin_url:
        pg_url, drop = pg_scratch_database(pg_admin_url)
        remote = RemoteBuilder(pg_url, due, idle_share, now, analyze=True)
    results: dict[str, dict[int, tuple[float, float]]] = {"SQLite": {}, "PostgreSQL": {}}
    try:
        for size in sizes:
            if remote is not None:
                remote.start(size)
            local.grow_to(size)
            if remote is not None:
                remote.wait()
            results["SQLite"][size] = _scan_times(sqlite_url, now, due, runs)
            if remote is not None:
                results["PostgreSQL"][size] = _scan_times(pg_url, now, due, runs)
    finally:
        local.close()
        if remote is not None:
            remote.close()
        if drop is not None:
            drop()
    _report(report, "SQLite", sizes, due, runs, results["SQLite"], local.build_seconds, idle_share)
    if remote is not None:
        _report(report, "PostgreSQL", sizes, due, runs, results["PostgreSQL"], remote.build_seconds, idle_share)
    else:
        report.note("Row 5: PostgreSQL not scanned (not reachable, or skipped to stay within the time budget).")


if __name__ == "__main__":
    sys.exit(_builder_main(sys.argv[1:]))
