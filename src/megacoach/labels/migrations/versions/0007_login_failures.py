"""The log-in throttle's counts in the store (``login_failures``), shared by every server process.

Revision ID: 0007_login_failures
Revises: 0006_assignment_index

A new table only: failed log-ins per client address and per client address + account name (hashed
keys), with the time of the last one. Nothing is keyed by the account alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_login_failures"
down_revision = "0006_assignment_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_login_failures"),
    )
    op.create_index("ix_login_failures_kind_last", "login_failures", ["kind", "last_failed_at"])


def downgrade() -> None:
    op.drop_index("ix_login_failures_kind_last", table_name="login_failures")
    op.drop_table("login_failures")
