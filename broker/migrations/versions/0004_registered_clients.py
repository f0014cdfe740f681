"""Dynamically registered clients of servers added by URL (``discover: mcp``).

One row per server key: ``pending`` while one process discovers and
registers (the primary key makes that a single flight), then ``ready`` with
the discovered endpoints (plain JSON, no secret) and the sealed client id and
secret.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from broker.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registered_clients",
        sa.Column("server_key", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("generation", sa.String(32), nullable=False),
        sa.Column("claim_until", UTCDateTime, nullable=True),
        sa.Column("discovered", sa.Text, nullable=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registered_clients")
