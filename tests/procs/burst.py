"""A client process for cross-process tests: N threads resolve one pair at once.

Prints one JSON line: the SHA-256 of each token received (never the token),
errors by code, and the client's fast/flight counts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time

from broker.settings import load_settings
from workers.client import BrokerClient
from workers.common.metrics import METRICS


def main() -> int:
    user, server, threads, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    start_at = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    client = BrokerClient(settings=load_settings(env_file=None))
    barrier = threading.Barrier(threads)
    digests: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        while time.time() < start_at:
            time.sleep(0.001)
        try:
            r = client.resolve(user, server, timeout=timeout)
            d = hashlib.sha256(r.value.reveal().encode()).hexdigest()
            with lock:
                digests.append(d)
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(getattr(exc, "code", type(exc).__name__))

    ts = [threading.Thread(target=one) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    client.close()
    print(json.dumps({
        "digests": digests, "errors": errors,
        "joins": METRICS.value("credbroker_flight_joins_total"),
        "started": METRICS.value("credbroker_flights_started_total"),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
