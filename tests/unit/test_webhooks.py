"""Webhook message, signature, backoff and endpoint labels; the settings."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from broker.errors import ConfigError
from broker.events import Event
from broker.settings import load_settings
from workers.webhooks import endpoint_label, message, retry_delay, signed_headers

AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def test_message_is_stable_and_verifies_with_the_package() -> None:
    event = Event(7, "connection.degraded", "alice", "github", "degraded", "http_502", AT)
    msg_id, body = message(event)
    assert (msg_id, body) == message(event) and msg_id == "evt_7"
    assert json.loads(body) == {"type": "connection.degraded", "timestamp": AT.isoformat(),
                                "data": event.to_dict()}
    now = datetime.now(UTC)
    headers = signed_headers(SECRET, msg_id, body, now)
    assert Webhook(SECRET).verify(body, headers)["data"]["reason"] == "http_502"
    with pytest.raises(Exception):
        Webhook("whsec_" + base64.b64encode(os.urandom(32)).decode()).verify(body, headers)


def test_backoff_doubles_and_caps() -> None:
    assert [retry_delay(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    assert retry_delay(30) == 300
    assert retry_delay(2, base=0.2) == 0.4


def test_endpoint_label_drops_query_and_userinfo() -> None:
    assert endpoint_label("https://user:pw@hooks.example.com:8443/in?token=abc") == "https://hooks.example.com:8443/in"


def test_settings() -> None:
    s = load_settings({"CREDBROKER_WEBHOOK_URLS": "https://a.test/h, http://127.0.0.1:9/x",
                       "CREDBROKER_WEBHOOK_SECRET": SECRET}, env_file=None)
    assert s.webhook_urls == ("https://a.test/h", "http://127.0.0.1:9/x")
    assert s.webhook_secret is not None and SECRET not in repr(s) and "a.test" not in repr(s)
    for bad in ("nope", "whsec_", "whsec_" + base64.b64encode(b"short").decode(), "whsec_!!!!"):
        with pytest.raises(ConfigError) as info:
            load_settings({"CREDBROKER_WEBHOOK_SECRET": bad}, env_file=None)
        assert bad not in str(info.value) or bad == "whsec_"
    with pytest.raises(ConfigError):
        load_settings({"CREDBROKER_WEBHOOK_URLS": "ftp://x.test/"}, env_file=None)
