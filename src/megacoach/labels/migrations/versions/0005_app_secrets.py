"""The labeling app's server-side secrets (``app_secrets``): the key of the shown order.

Revision ID: 0005_app_secrets
Revises: 0004_token_scopes

A new table only; the app creates its secrets on first start.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_app_secrets"
down_revision = "0004_token_scopes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "app_secrets",
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_app_secrets"),
    )


def downgrade() -> None:
    op.drop_table("app_secrets")
