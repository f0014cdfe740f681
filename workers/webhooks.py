"""Signed webhook delivery of connection events (Standard Webhooks).

Each event goes to each ``CREDBROKER_WEBHOOK_URLS`` endpoint as
``POST {"type", "timestamp", "data": event}`` with the ``webhook-id``
(``evt_<event id>``, the same on every attempt, so receivers deduplicate),
``webhook-timestamp`` and ``webhook-signature`` headers made by the
``standardwebhooks`` package. Attempts are logged in ``webhook_deliveries``;
after the last one the row says ``dead`` (the dead letter). The body and
headers never carry a secret; endpoint URLs are logged without their query.
"""

from __future__ import annotations

import json
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import Engine, insert, select

from broker.db import webhook_deliveries as W
from broker.events import Event

__all__ = ["message", "signed_headers", "retry_delay", "endpoint_label", "DeliveryLog",
           "DELIVERED", "FAILED", "DEAD"]

DELIVERED = "delivered"
FAILED = "failed"
DEAD = "dead"


def message(event: Event) -> tuple[str, str]:
    """(webhook id, JSON body) of an event; the id is stable across attempts."""
    body = {"type": event.type, "timestamp": event.at.isoformat(), "data": event.to_dict()}
    return f"evt_{event.id}", json.dumps(body, separators=(",", ":"), sort_keys=True)


def signed_headers(secret: str, msg_id: str, body: str, now: datetime) -> dict[str, str]:
    from standardwebhooks.webhooks import Webhook

    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }


def retry_delay(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds before attempt ``attempt + 1``: exponential (1, 2, 4, ...) and capped."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


def endpoint_label(url: str) -> str:
    """An endpoint as logs and the delivery log show it: no query, no userinfo."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"[:300]


class DeliveryLog:
    """The attempts table; ``dead`` rows are the dead letters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, event_id: int, endpoint: str, attempt: int, outcome: str, status_code: int | None,
               error: str | None, at: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(W).values(event_id=event_id, endpoint=endpoint, attempt=attempt, outcome=outcome,
                                          status_code=status_code, error=(error or None) and error[:64], at=at))

    def delivered(self, event_id: int, endpoint: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(W.c.id).where(W.c.event_id == event_id, W.c.endpoint == endpoint,
                                                     W.c.outcome == DELIVERED).limit(1)).first() is not None

    def rows(self, event_id: int | None = None) -> list[dict[str, object]]:
        stmt = select(W).order_by(W.c.id)
        if event_id is not None:
            stmt = stmt.where(W.c.event_id == event_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]
