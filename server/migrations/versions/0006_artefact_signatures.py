"""signed artefacts and signing keys: issue 9

- ``signing_keys``: the public keys agents are told to trust (pinned at enrollment).
- ``key_statements``: signed key statements (rotation and retirement), sent to agents in order.
- ``artefact_signatures``: one Ed25519 signature per (artefact, key) over the artefact's
  statement (docs/protocol.md#signed-artefacts).

Upgrading: artefacts published before this revision have no signature, and agents refuse
unsigned artefacts; ``edgeloop server signing backfill`` signs them (after re-hashing each blob).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 18:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_signing_keys")),
    )
    op.create_table(
        "key_statements",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signer_key_id", sa.String(length=64), nullable=False),
        sa.Column("statement", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_statements")),
    )
    op.create_table(
        "artefact_signatures",
        sa.Column("artefact_sha256", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.LargeBinary(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["artefact_sha256"], ["artefacts.sha256"], ondelete="CASCADE",
                                name=op.f("fk_artefact_signatures_artefact_sha256_artefacts")),
        sa.PrimaryKeyConstraint("artefact_sha256", "key_id", name=op.f("pk_artefact_signatures")),
    )


def downgrade() -> None:
    op.drop_table("artefact_signatures")
    op.drop_table("key_statements")
    op.drop_table("signing_keys")
