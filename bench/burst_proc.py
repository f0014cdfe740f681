"""One burst caller process: ``python -m bench.burst_proc``, driven over stdin.

Each stdin line is a JSON command ``{"user", "server", "threads", "start_at",
"timeout"}``: that many threads resolve the pair at wall-clock ``start_at``.
The reply is one JSON line on stdout: each caller's wait in seconds from
``start_at``, error codes, and this process's flights started and joined.
Tokens are never printed.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from broker.settings import load_settings
from workers.client import BrokerClient
from workers.common.metrics import METRICS


def burst(client: BrokerClient, cmd: dict[str, object]) -> dict[str, object]:
    threads = int(cmd["threads"])  # type: ignore[call-overload]
    start_at = float(cmd["start_at"])  # type: ignore[arg-type]
    user, server, timeout = str(cmd["user"]), str(cmd["server"]), float(cmd["timeout"])  # type: ignore[arg-type]
    go = threading.Event()
    waits: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    started = METRICS.value("credbroker_flights_started_total")
    joins = METRICS.value("credbroker_flight_joins_total")

    def one() -> None:
        go.wait()
        try:
            client.resolve(user, server, timeout=timeout)
            done = time.time() - start_at
            with lock:
                waits.append(done)
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(getattr(exc, "code", type(exc).__name__))

    pool = [threading.Thread(target=one, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    go.set()
    for t in pool:
        t.join()
    return {
        "waits": waits, "errors": errors,
        "started": METRICS.value("credbroker_flights_started_total") - started,
        "joins": METRICS.value("credbroker_flight_joins_total") - joins,
    }


def main() -> int:
    client = BrokerClient(settings=load_settings(env_file=None))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(burst(client, json.loads(line))), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
