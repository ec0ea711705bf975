"""device client certificates (mutual TLS)

Placeholder revision (no schema change yet);  issue 9:H-mtls fills it in or leaves it a no-op.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 22:00:00
"""

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
