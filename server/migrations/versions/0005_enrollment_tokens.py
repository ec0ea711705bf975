"""managed enrollment tokens: issue 9

PLACEHOLDER (no-op) created by the lead so the revision chain is fixed while it is written.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:00:00
"""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
