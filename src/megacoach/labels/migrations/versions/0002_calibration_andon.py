"""Calibration pool and overlap on items; too-fast flag and confidence on labels; Andon cord; run status.

Revision ID: 0002
Revises: 0001

Only additive changes (new nullable/defaulted columns, new tables), so old rows keep their meaning:
existing items get is_calibration = false and overlap = 1, existing labels too_fast = false.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table copy), which SQLite and PostgreSQL both do in place.
    op.add_column("items", sa.Column("is_calibration", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("items", sa.Column("overlap", sa.Integer(), server_default="1", nullable=False))
    op.add_column("comparisons", sa.Column("too_fast", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("comparisons", sa.Column("confidence", sa.Integer(), nullable=True))
    op.create_table(
        "andon_pulls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_andon_pulls"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_andon_pulls_labeler_id_labelers"),
    )
    op.create_index("ix_andon_pulls_run_id", "andon_pulls", ["run_id"])
    op.create_table(
        "run_status",
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_run_status"),
        sa.CheckConstraint("status IN ('running', 'paused', 'halted', 'finished')", name="ck_run_status_status"),
    )


def downgrade() -> None:
    op.drop_table("run_status")
    op.drop_index("ix_andon_pulls_run_id", table_name="andon_pulls")
    op.drop_table("andon_pulls")
    with op.batch_alter_table("comparisons") as batch:
        batch.drop_column("confidence")
        batch.drop_column("too_fast")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("overlap")
        batch.drop_column("is_calibration")
