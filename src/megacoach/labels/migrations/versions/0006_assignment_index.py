"""Assignment from an index (several server processes share one store).

Revision ID: 0006_assignment_index
Revises: 0005_app_secrets

- ``items.filled`` (false by default) with the indexes ``ix_items_open`` (filled, id) and
  ``ix_items_open_source`` (filled, source, id): the assigner reads the open items in id order without
  reading the finished ones. Existing calibration and gold items, and items with at least ``overlap``
  labels, are marked filled here (the assigner re-checks the marks when it serves with a larger
  ``--overlap``).
- ``ix_items_is_calibration`` and ``ix_items_is_gold``: the shared pool without a scan of the items;
  ``ix_skips_item_labeler`` (item_id, labeler_id): whether a labeler skipped an item, in one probe.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_assignment_index"
down_revision = "0005_app_secrets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("filled", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute(
        "UPDATE items SET filled = "
        + ("true" if op.get_context().dialect.name == "postgresql" else "1")
        + " WHERE is_calibration OR is_gold OR "
        "(SELECT count(*) FROM comparisons WHERE comparisons.item_id = items.id) >= items.overlap")
    op.create_index("ix_items_open", "items", ["filled", "id"])
    op.create_index("ix_items_open_source", "items", ["filled", "source", "id"])
    op.create_index("ix_items_is_calibration", "items", ["is_calibration"])
    op.create_index("ix_items_is_gold", "items", ["is_gold"])
    op.create_index("ix_skips_item_labeler", "skips", ["item_id", "labeler_id"])


def downgrade() -> None:
    op.drop_index("ix_skips_item_labeler", table_name="skips")
    op.drop_index("ix_items_is_gold", table_name="items")
    op.drop_index("ix_items_is_calibration", table_name="items")
    op.drop_index("ix_items_open_source", table_name="items")
    op.drop_index("ix_items_open", table_name="items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("filled")
