"""model identity v2 (the model hash covers the architecture): issue 8 fault 1

PLACEHOLDER (no-op) created by the lead so the revision chain is fixed while it is written.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 18:00:00
"""

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
