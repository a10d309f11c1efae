"""Ties, "none acceptable", adjudication and gold explanations.

Revision ID: 0009_verdicts_adjudication
Revises: 0008_rate_limits

- ``comparisons.verdict`` (``best`` for every existing label): ``tie`` (the best continuations are equally
  good) and ``none`` (none is acceptable) are recorded as what they are, with ``chosen`` NULL (the column
  becomes nullable; a check keeps ``chosen`` set exactly for ``best``).
- ``comparisons.adjudication`` (false for existing labels): an adjudicator's decision on an item whose
  labels disagree; at most one per item (the partial unique index ``uq_comparisons_adjudication``).
- ``items.gold_explanation`` (NULL for existing items): why a gold item's answer is right, shown to a
  labeler who misses it.
- ``labelers.adjudicator`` (false for existing accounts): a labeler who may decide disagreements.

Downgrading deletes what the older schema cannot hold: tie and "none acceptable" labels and adjudicators'
decisions (every other label is kept as it was).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_verdicts_adjudication"
down_revision = "0008_rate_limits"
branch_labels = None
depends_on = None

_CHOSEN_MATCHES_VERDICT = "(verdict = 'best' AND chosen IS NOT NULL) OR (verdict <> 'best' AND chosen IS NULL)"


def upgrade() -> None:
    with op.batch_alter_table("comparisons") as batch:
        batch.add_column(sa.Column("verdict", sa.String(10), nullable=False, server_default="best"))
        batch.add_column(sa.Column("adjudication", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.alter_column("chosen", existing_type=sa.Integer(), nullable=True)
        batch.create_check_constraint("ck_comparisons_verdict", "verdict IN ('best', 'tie', 'none')")
        batch.create_check_constraint("ck_comparisons_chosen_matches_verdict", _CHOSEN_MATCHES_VERDICT)
    op.create_index("uq_comparisons_adjudication", "comparisons", ["item_id"], unique=True,
                    sqlite_where=sa.text("adjudication"), postgresql_where=sa.text("adjudication"))
    op.add_column("items", sa.Column("gold_explanation", sa.Text(), nullable=True))
    op.add_column("labelers", sa.Column("adjudicator", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.execute("DELETE FROM comparisons WHERE verdict <> 'best' OR adjudication")
    with op.batch_alter_table("labelers") as batch:
        batch.drop_column("adjudicator")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("gold_explanation")
    op.drop_index("uq_comparisons_adjudication", table_name="comparisons")
    with op.batch_alter_table("comparisons") as batch:
        batch.drop_constraint("ck_comparisons_chosen_matches_verdict", type_="check")
        batch.drop_constraint("ck_comparisons_verdict", type_="check")
        batch.alter_column("chosen", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("adjudication")
        batch.drop_column("verdict")
