"""The labeling app's tables: web sessions, invitations, API tokens, item locks, Andon clears.

Revision ID: 0003_app_auth
Revises: 0002

Only new tables (see megacoach/labels/schema.py); existing rows are untouched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_app_auth"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_web_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_web_sessions_token_hash"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_web_sessions_labeler_id_labelers"),
    )
    op.create_index("ix_web_sessions_labeler_id", "web_sessions", ["labeler_id"])
    op.create_table(
        "invitations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(10), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.Column("labeler_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_invitations"),
        sa.UniqueConstraint("token_hash", name="uq_invitations_token_hash"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_invitations_labeler_id_labelers"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_api_tokens_labeler_id_labelers"),
    )
    op.create_index("ix_api_tokens_labeler_id", "api_tokens", ["labeler_id"])
    op.create_table(
        "item_locks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("locked_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_item_locks"),
        sa.UniqueConstraint("item_id", "labeler_id", name="uq_item_locks_item_labeler"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name="fk_item_locks_item_id_items"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_item_locks_labeler_id_labelers"),
    )
    op.create_index("ix_item_locks_item_id", "item_locks", ["item_id"])
    op.create_index("ix_item_locks_labeler_id", "item_locks", ["labeler_id"])
    op.create_index("ix_item_locks_expires_at", "item_locks", ["expires_at"])
    op.create_table(
        "andon_clears",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("labeler_id", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_andon_clears"),
        sa.ForeignKeyConstraint(["labeler_id"], ["labelers.id"], name="fk_andon_clears_labeler_id_labelers"),
    )
    op.create_index("ix_andon_clears_run_id", "andon_clears", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_andon_clears_run_id", table_name="andon_clears")
    op.drop_table("andon_clears")
    for name in ("ix_item_locks_expires_at", "ix_item_locks_labeler_id", "ix_item_locks_item_id"):
        op.drop_index(name, table_name="item_locks")
    op.drop_table("item_locks")
    op.drop_index("ix_api_tokens_labeler_id", table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("invitations")
    op.drop_index("ix_web_sessions_labeler_id", table_name="web_sessions")
    op.drop_table("web_sessions")
