"""p-Meta few-shot state

Placeholder revision (no schema change yet);  issue 10:H-pmetasys fills it in or leaves it a no-op.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 22:00:00
"""

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
