"""managed enrollment tokens: issue 9

- ``enrollment_tokens``: operator-issued Register credentials (hashed secret, granted tags,
  expiry, use count and limit, revocation); server.domain.enrollment.
  ``reenroll`` marks a token that may also re-register (rotate the credential of) a hardware
  id another token enrolled; an ordinary token re-registers only the devices it enrolled.
- ``enrollments``: which hardware ids each token enrolled, so a device re-registering with
  the token that enrolled it consumes no further use.

Upgrading changes no existing row. The server no longer has a built-in shared enrollment
token: after the upgrade no agent can register until an operator creates a token
(``edgeloop server enrollment create``); devices already registered keep their credentials.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reenroll", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_tokens")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_enrollment_tokens_secret_hash")),
    )
    op.create_table(
        "enrollments",
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("hardware_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["enrollment_tokens.id"],
                                name=op.f("fk_enrollments_token_id_enrollment_tokens"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_id", "hardware_id", name=op.f("pk_enrollments")),
    )


def downgrade() -> None:
    op.drop_table("enrollments")
    op.drop_table("enrollment_tokens")
