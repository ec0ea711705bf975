"""DA3 per-cohort adaptors

Placeholder revision (no schema change yet);  issue 11:H-da3sys fills it in or leaves it a no-op.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 22:00:00
"""

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
