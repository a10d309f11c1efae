"""Initial label store: queries, samples, items, comparisons, skips, labelers, guidelines, audit log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_queries"),
    )
    op.create_table(
        "labelers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("role", sa.String(10), nullable=False),
        sa.Column("password_hash", sa.String(500), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_labelers"),
        sa.UniqueConstraint("name", name="uq_labelers_name"),
        sa.CheckConstraint("kind IN ('person', 'program')", name="ck_labelers_kind"),
        sa.CheckConstraint("role IN ('admin', 'labeler', 'program')", name="ck_labelers_role"),
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("policy", sa.String(500), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], name="fk_samples_query_id_queries"),
    )
    op.create_index("ix_samples_query_id", "samples", ["query_id"])
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("sample_ids", sa.JSON(), nullable=False),
        sa.Column("batch", sa.String(200), nullable=False),
        sa.Column("split", sa.String(10), nullable=False),
        sa.Column("source", sa.String(50), nullable=False),
        sa.Column("is_gold", sa.Boolean(), nullable=False),
        sa.Column("gold_choice", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_items"),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], name="fk_items_query_id_queries"),
        sa.CheckConstraint("k >= 2", name="ck_items_k_at_least_2"),
        sa.CheckConstraint("split IN ('train', 'valid')", name="ck_items_split"),
    )
    op.create_index("ix_items_query_id", "items", ["query_id"])
    op.create_index("ix_items_batch_split", "items", ["batch", "split"])
    op.create_table(
        "comparisons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("chosen", sa.Integer(), nullable=False),
        sa.Column("shown_order", sa.JSON(), nullable=False),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("labeler_kind", sa.String(10), nullable=False),
        sa.Column("guideline_version", sa.String(100), nullable=False),
        sa.Column("time_taken_s", sa.Float(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("split", sa.String(10), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_comparisons"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name="fk_comparisons_item_id_items"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_comparisons_labeler_id_labelers"),
        sa.UniqueConstraint("item_id", "labeler_id", name="uq_comparisons_item_labeler"),
        sa.CheckConstraint("chosen >= 0", name="ck_comparisons_chosen_nonnegative"),
        sa.CheckConstraint("labeler_kind IN ('person', 'program')", name="ck_comparisons_labeler_kind"),
        sa.CheckConstraint("split IN ('train', 'valid')", name="ck_comparisons_split"),
    )
    op.create_index("ix_comparisons_item_id", "comparisons", ["item_id"])
    op.create_index("ix_comparisons_labeler_id", "comparisons", ["labeler_id"])
    op.create_table(
        "skips",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_skips"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name="fk_skips_item_id_items"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_skips_labeler_id_labelers"),
    )
    op.create_index("ix_skips_item_id", "skips", ["item_id"])
    op.create_index("ix_skips_labeler_id", "skips", ["labeler_id"])
    op.create_table(
        "guidelines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("markdown", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_guidelines"),
        sa.UniqueConstraint("version", name="uq_guidelines_version"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(200), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    for table in ("audit_log", "guidelines", "skips", "comparisons", "items", "samples", "labelers", "queries"):
        op.drop_table(table)
