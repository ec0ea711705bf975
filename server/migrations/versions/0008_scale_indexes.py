"""indexes for database-side pagination and the update planner: issue 12 (filled in by the
scale work; a no-op until then)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 01:00:00
"""

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
