"""device client certificates (mutual TLS): issue 9

- ``device_client_certificates``: each client certificate the server's local CA issued to a
  device (fingerprint, serial, expiry, revocation); the mTLS port accepts only these.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 22:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_client_certificates",
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE",
                                name=op.f("fk_device_client_certificates_device_id_devices")),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_device_client_certificates")),
    )
    with op.batch_alter_table("device_client_certificates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_client_certificates_device_id"), ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device_client_certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_client_certificates_device_id"))
    op.drop_table("device_client_certificates")
