"""Initial schema: credentials, subject_tokens, audit_events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from broker.db import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credentials",
        sa.Column("user_id", sa.String(256), primary_key=True),
        sa.Column("server_key", sa.String(64), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("obtained_via", sa.String(24), nullable=False),
        sa.Column("token_type", sa.String(32), nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("audience", sa.Text, nullable=True),
        sa.Column("issued_at", UTCDateTime, nullable=True),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("refresh_at", UTCDateTime, nullable=True),
        sa.Column("failure", sa.String(64), nullable=True),
        sa.Column("last_used_at", UTCDateTime, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_index("ix_credentials_expires_at", "credentials", ["expires_at"])
    op.create_index("ix_credentials_refresh_at", "credentials", ["refresh_at"])
    op.create_index("ix_credentials_key_id", "credentials", ["key_id"])
    op.create_table(
        "subject_tokens",
        sa.Column("user_id", sa.String(256), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_index("ix_subject_tokens_key_id", "subject_tokens", ["key_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", UTCDateTime, nullable=False),
        sa.Column("user_id", sa.String(256), nullable=True),
        sa.Column("server", sa.String(128), nullable=True),
        sa.Column("method", sa.String(24), nullable=True),
        sa.Column("action", sa.String(24), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
    )
    op.create_index("ix_audit_ts", "audit_events", ["ts"])
    op.create_index("ix_audit_user_ts", "audit_events", ["user_id", "ts"])
    op.create_index("ix_audit_server_ts", "audit_events", ["server", "ts"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("subject_tokens")
    op.drop_table("credentials")
