"""The bench's Celery app: the broker's own app plus a ``bench.noop`` task.

Workers started with ``-A bench.celery_bench`` run the broker tasks and the
no-op on the same processes, so the no-op measures exactly the Celery and
Redis round trip that a flight pays on top of its own work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery.signals import worker_ready

import workers.celery.tasks  # noqa: F401 - registers the broker tasks on the app
from workers.celery.app import app

__all__ = ["app", "noop", "NOOP"]

NOOP = "bench.noop"
# The bench sets this so it can tell when each worker consumes, without INFO logs.
READY_DIR_ENV = "CREDBROKER_BENCH_READY_DIR"


@app.task(name=NOOP)
def noop() -> dict[str, Any]:
    """Does nothing: the floor of one task round trip."""
    return {"ok": True}


@worker_ready.connect
def _announce_ready(sender: Any = None, **_: Any) -> None:
    ready_dir = os.environ.get(READY_DIR_ENV)
    if ready_dir and sender is not None:
        (Path(ready_dir) / str(sender.hostname)).write_text(str(os.getpid()))
