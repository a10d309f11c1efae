"""API tokens get scopes, an expiry and their minter; labels record how they arrived.

Revision ID: 0004_token_scopes
Revises: 0003_app_auth

- ``api_tokens.scopes`` (comma-separated: label, read, andon, admin), ``expires_at``, ``created_by``.
  Existing tokens expire 90 days after the upgrade. A program's token gets the scopes programs
  have (label, read). A token owned by a person is kept only when the audit log shows that
  person minted it (scopes: what their role allows); other people's tokens could act as someone
  who never asked for one, so they are revoked.
- ``comparisons.via`` ("session" | "token" | NULL) and ``comparisons.api_token_id``; existing
  labels keep NULL (unknown).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0004_token_scopes"
down_revision = "0003_app_auth"
branch_labels = None
depends_on = None

ROLE_SCOPES = {"program": "label,read", "labeler": "label,andon", "admin": "label,read,andon,admin"}


def upgrade() -> None:
    op.add_column("api_tokens", sa.Column("scopes", sa.String(200), server_default="", nullable=False))
    op.add_column("api_tokens", sa.Column("expires_at", sa.DateTime(), nullable=True))
    op.add_column("api_tokens", sa.Column("created_by", sa.String(200), server_default="", nullable=False))
    op.add_column("comparisons", sa.Column("via", sa.String(10), nullable=True))
    op.add_column("comparisons", sa.Column("api_token_id", sa.Integer(), nullable=True))

    conn = op.get_bind()
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    tokens = sa.table("api_tokens", sa.column("id", sa.Integer), sa.column("labeler_id", sa.Integer),
                      sa.column("scopes", sa.String), sa.column("expires_at", sa.DateTime),
                      sa.column("created_by", sa.String), sa.column("revoked_at", sa.DateTime))
    labelers = sa.table("labelers", sa.column("id", sa.Integer), sa.column("name", sa.String),
                        sa.column("role", sa.String))
    audit = sa.table("audit_log", sa.column("actor", sa.String), sa.column("action", sa.String),
                     sa.column("detail", sa.JSON))
    minted_by: dict[int, str] = {}
    for actor, detail in conn.execute(sa.select(audit.c.actor, audit.c.detail).where(audit.c.action == "token_create")):
        if isinstance(detail, dict) and isinstance(detail.get("token_id"), int):
            minted_by[detail["token_id"]] = actor
    rows = conn.execute(sa.select(tokens.c.id, labelers.c.name, labelers.c.role)
                        .select_from(tokens.join(labelers, labelers.c.id == tokens.c.labeler_id))).all()
    for token_id, owner, role in rows:
        values = dict(scopes=ROLE_SCOPES.get(role, ""), expires_at=now + dt.timedelta(days=90),
                      created_by=minted_by.get(token_id, ""))
        if role != "program" and minted_by.get(token_id) != owner:
            values["revoked_at"] = sa.func.coalesce(tokens.c.revoked_at, now)
        conn.execute(sa.update(tokens).where(tokens.c.id == token_id).values(**values))


def downgrade() -> None:
    with op.batch_alter_table("comparisons") as batch:
        batch.drop_column("api_token_id")
        batch.drop_column("via")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("created_by")
        batch.drop_column("expires_at")
        batch.drop_column("scopes")
