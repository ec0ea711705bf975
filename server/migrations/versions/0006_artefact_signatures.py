"""signed artefacts and signing keys: issue 9

PLACEHOLDER (no-op) created by the lead so the revision chain is fixed while it is written.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 18:00:00
"""

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
