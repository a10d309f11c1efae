"""The request rate limits' windows in the store (``rate_limits``), shared by every server process.

Revision ID: 0008_rate_limits
Revises: 0007_login_failures

- ``rate_limits``: per key (a hash of the limit's kind and, for the Andon cord, the client address and
  the person), the times of the requests let through within the window, when a refusal was last
  audited, and the latest of these times.
- ``login_failures.refusal_noted_at`` (NULL for existing rows: no refused try seen since their last
  failure): a throttled client's first refused try is audited once, whichever process refused it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_rate_limits"
down_revision = "0007_login_failures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("hits", sa.JSON(), nullable=False),
        sa.Column("last_at", sa.Float(), nullable=False),
        sa.Column("refusal_noted_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("key", name="pk_rate_limits"),
    )
    op.create_index("ix_rate_limits_kind_last", "rate_limits", ["kind", "last_at"])
    op.add_column("login_failures", sa.Column("refusal_noted_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("login_failures") as batch:
        batch.drop_column("refusal_noted_at")
    op.drop_index("ix_rate_limits_kind_last", table_name="rate_limits")
    op.drop_table("rate_limits")
