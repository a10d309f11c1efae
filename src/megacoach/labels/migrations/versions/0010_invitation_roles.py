"""Invitations for adjudicators: ``invitations.role`` widened from 10 to 20 characters.

Revision ID: 0010_invitation_roles
Revises: 0009_verdicts_adjudication

An invitation's role is ``labeler``, ``adjudicator`` (a labeler who may also decide disagreements: accepting
it creates a labeler with ``labelers.adjudicator`` set) or ``admin``; "adjudicator" did not fit the old
column. Existing invitations are untouched.

Downgrading turns every adjudicator invitation (open, used or expired) into a labeler invitation: an open one
accepted afterwards makes a plain labeler (an admin can still allow them to decide on the People page); the
accounts already made from such invitations keep their ``labelers.adjudicator`` flag, and the audit log keeps
the role each invitation was issued with.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_invitation_roles"
down_revision = "0009_verdicts_adjudication"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invitations") as batch:
        batch.alter_column("role", existing_type=sa.String(10), type_=sa.String(20), existing_nullable=False)


def downgrade() -> None:
    op.execute("UPDATE invitations SET role = 'labeler' WHERE role = 'adjudicator'")
    with op.batch_alter_table("invitations") as batch:
        batch.alter_column("role", existing_type=sa.String(20), type_=sa.String(10), existing_nullable=False)
