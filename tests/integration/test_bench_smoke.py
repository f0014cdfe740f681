"""The benchmark's smoke run: ``python -m bench --smoke`` exits 0 and prints a
table with every row (fast path, HTTP, miss path, burst, scan, refresh, memory,
isolation from a hung server, refresh backlog)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import redis_available
from tests.conftest import missing_service

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT = 150  # the smoke run takes ~35 s on 2 cores; leave room for a loaded CI machine
ROWS = ("1", "1b", "1c", "2", "3", "4", "5", "6", "7", "8", "9")


@pytest.mark.timeout(SMOKE_TIMEOUT + 60)
def test_bench_smoke_prints_every_row() -> None:
    if not redis_available("redis://127.0.0.1:6379/0"):
        missing_service("Redis at 127.0.0.1:6379")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--smoke"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=SMOKE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops its workers, API and sandbox on SIGTERM
        try:
            out, err = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"python -m bench --smoke did not finish in {SMOKE_TIMEOUT} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-5000:]
    table = [line for line in out.splitlines() if re.match(r"^\| \d[a-z]? \|", line)]
    sections = {line.split("|")[1].strip() for line in table}
    assert sections == set(ROWS), (sections, out[-3000:])
    assert not any("not run" in line for line in table), out
    # smoke mode checks no thresholds: the verdict column stays empty
    assert "MISSED" not in out and "| met |" not in out
    for text in ("## Machine", "CPU", "Python", "Redis", "PostgreSQL"):
        assert text in out
    for measure in ("fast-path resolve", "DPoP proof", "HTTP resolve", "miss path", "burst", "due scan", "proactive refresh",
                    "peak RSS"):
        assert measure in out, measure
