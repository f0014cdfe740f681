"""Signed webhooks on a real cluster: a loopback receiver gets deliveries that
verify with the receiver side of the ``standardwebhooks`` package; a receiver
that fails three times then recovers gets each event once, with no loss; a
receiver that never recovers ends in the dead-letter log; a slow receiver
does not slow resolves."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from broker.db import make_engine
from tests.cluster import Cluster, wait_for
from tests.integration.test_cluster import connect, sign_in
from workers.webhooks import DEAD, DELIVERED, FAILED, DeliveryLog

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Receiver:
    """A webhook endpoint on loopback that answers a scripted list of statuses
    (then 200), optionally after a delay, and keeps what it got."""

    def __init__(self, script: list[int] | None = None, delay: float = 0.0) -> None:
        self.script = list(script or [])
        self.delay = delay
        self.got: list[tuple[int, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                time.sleep(outer.delay)
                with outer.lock:
                    status = outer.script.pop(0) if outer.script else 200
                    outer.got.append((status, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks?tenant=t1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for s, h, b in self.got if 200 <= s < 300]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_signed_deliveries_retries_and_dead_letters(tmp_path, sandbox) -> None:  # type: ignore[no-untyped-def]
    flaky = Receiver([500, 503, 500])
    broken = Receiver([500] * 100)
    slow = Receiver(delay=2.0)
    cluster = Cluster(tmp_path, sandbox.url, extra_env={
        "CREDBROKER_WEBHOOK_URLS": ",".join([flaky.url, broken.url, slow.url]),
        "CREDBROKER_WEBHOOK_SECRET": SECRET,
        "CREDBROKER_WEBHOOK_RETRY_SECONDS": "0.2",
        "CREDBROKER_WEBHOOK_MAX_ATTEMPTS": "4",
    })
    try:
        cluster.start_worker("w1", concurrency=8, pool="threads")
        connect(cluster, "hana")
        wait_for(lambda: len(flaky.accepted()) == 1, 30, what="the flaky receiver to accept the event")
        # Three failures, then the same message (same webhook-id) accepted once.
        assert [s for s, _, _ in flaky.got] == [500, 503, 500, 200]
        assert len({h["webhook-id"] for _, h, _ in flaky.got}) == 1
        headers, body = flaky.accepted()[0]
        payload = Webhook(SECRET).verify(body, headers)
        assert payload["type"] == "connection.connected"
        assert payload["data"]["user_id"] == "hana" and payload["data"]["server"] == "gh"
        assert set(payload["data"]) == {"id", "type", "user_id", "server", "status", "reason", "at"}
        with pytest.raises(Exception):
            Webhook("whsec_" + base64.b64encode(os.urandom(32)).decode()).verify(body, headers)
        tampered = body.replace(b"hana", b"hanb")
        with pytest.raises(Exception):
            Webhook(SECRET).verify(tampered, headers)

        # The broken receiver: four attempts, then a dead letter; nothing else is lost.
        engine = make_engine(cluster.settings.database_url)
        log = DeliveryLog(engine)

        def outcomes(endpoint_part: str) -> list[str]:
            return [r["outcome"] for r in log.rows() if endpoint_part in str(r["endpoint"])]

        port = str(broken.server.server_address[1])
        wait_for(lambda: DEAD in outcomes(port), 30, what="the dead letter")
        assert outcomes(port) == [FAILED, FAILED, FAILED, DEAD]
        assert len(broken.got) == 4
        flaky_port = str(flaky.server.server_address[1])
        wait_for(lambda: outcomes(flaky_port) == [FAILED, FAILED, FAILED, DELIVERED], 10, what="the delivery log")
        assert all("tenant" not in str(r["endpoint"]) for r in log.rows())  # no query in the log

        # A slow receiver (2 s a delivery) never slows resolves.
        sign_in(cluster, sandbox, "hana")
        with cluster.client() as client:
            started = time.monotonic()
            for server in ("tx", "obo"):
                client.resolve("hana", server, timeout=20)
            elapsed = time.monotonic() - started
        wait_for(lambda: len(slow.accepted()) >= 3, 30, what="the slow receiver to get three events")
        assert elapsed < 1.5, elapsed
        # Every event reached every live receiver exactly once.
        ids = [json.loads(b)["data"]["id"] for _, b in flaky.accepted()]
        wait_for(lambda: len(flaky.accepted()) == 3, 20, what="all events at the flaky receiver")
        ids = [json.loads(b)["data"]["id"] for _, b in flaky.accepted()]
        assert len(ids) == len(set(ids)) == 3
        for _, h, b in flaky.got[-2:]:
            Webhook(SECRET).verify(b, h)
        engine.dispose()
    finally:
        cluster.stop()
        for r in (flaky, broken, slow):
            r.stop()
