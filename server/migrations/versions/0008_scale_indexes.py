"""indexes for database-side pagination and the update planner: issue 12

Every REST list is a page the database cuts (COUNT, then ORDER BY ... OFFSET/LIMIT on an index
that holds the order), and the update planner reads artefacts by their target
(ix_artefacts_target_model_hash, from 0001) along the target's ancestry only.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 01:00:00
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEXES = (  # (name, table, columns); mirrored in server/db/models.py
    ("ix_devices_created_at_id", "devices", ["created_at", "id"]),
    ("ix_samples_device_id_label", "samples", ["device_id", "label"]),
    ("ix_model_versions_lineage_number", "model_versions", ["lineage", "number"]),
    ("ix_rounds_created_at_id", "rounds", ["created_at", "id"]),
    ("ix_operator_tokens_created_at_id", "operator_tokens", ["created_at", "id"]),
    ("ix_audit_events_token_name", "audit_events", ["token_name"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
