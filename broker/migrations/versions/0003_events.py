"""Connection lifecycle events: the outbox, the webhook delivery log, cursors.

- ``credentials.announced_status``: the status last announced as an event for
  the row; an event is written, in the same transaction as the status change,
  only when the row's status (or expiry) differs from it.
- ``connection_events``: the outbox, read oldest first by id (the cursor).
- ``event_cursors``: how far a consumer (the webhook dispatcher) has read.
- ``webhook_deliveries``: one row per delivery attempt; ``dead`` after the last.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from broker.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("announced_status", sa.String(24), nullable=True))
    # Rows that exist already were announced by nobody: take their status as known.
    op.execute("UPDATE credentials SET announced_status = status")
    op.create_table(
        "connection_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("server_key", sa.String(64), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_connection_events_user", "connection_events", ["user_id", "id"])
    op.create_table(
        "event_cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.Column("endpoint", sa.String(300), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_webhook_deliveries_event", "webhook_deliveries", ["event_id", "endpoint"])
    op.create_index("ix_webhook_deliveries_outcome", "webhook_deliveries", ["outcome", "at"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("event_cursors")
    op.drop_table("connection_events")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("announced_status")
