"""Second round: the lease fence, per-credential backoff, keep-alive, fair scan.

- ``lease_owner``/``lease_until``: the one flight allowed to present this row's
  refresh token or its user's subject token, until (database clock) then.
- ``next_attempt_at``/``failure_count``: no renewal before this time after a
  failure (exponential backoff per credential, honoured by beat and resolves).
- ``keepalive_at``: when an idle refresh token must be exercised before it
  dies of disuse (providers with ``refresh_token_idle_seconds``).
- ``(server_key, refresh_at)``: the due scan takes a fair share per server.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from broker.db import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_until", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("next_attempt_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("failure_count", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("keepalive_at", UTCDateTime, nullable=True))
    op.create_index("ix_credentials_server_refresh_at", "credentials", ["server_key", "refresh_at"])
    op.create_index("ix_credentials_keepalive_at", "credentials", ["keepalive_at"])


def downgrade() -> None:
    op.drop_index("ix_credentials_keepalive_at", "credentials")
    op.drop_index("ix_credentials_server_refresh_at", "credentials")
    with op.batch_alter_table("credentials") as batch:
        for name in ("keepalive_at", "failure_count", "next_attempt_at", "lease_until", "lease_owner"):
            batch.drop_column(name)
