"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21 21:50:53.696905
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "artefacts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("encoding", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("base_model_hash", sa.String(length=64), nullable=True),
        sa.Column("target_model_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_artefacts")),
    )
    with op.batch_alter_table("artefacts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_artefacts_base_model_hash"), ["base_model_hash"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_artefacts_target_model_hash"), ["target_model_hash"], unique=False
        )

    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("hardware_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=False),
        sa.Column("credential_hash", sa.String(length=64), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("model_hash", sa.String(length=64), nullable=False),
        sa.Column("target_model_hash", sa.String(length=64), nullable=False),
        sa.Column("active_subnet", sa.Integer(), nullable=False),
        sa.Column("budget", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("samples_pending", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("credential_hash", name=op.f("uq_devices_credential_hash")),
        sa.UniqueConstraint("hardware_id", name=op.f("uq_devices_hardware_id")),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("cohort", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("progress_message", sa.Text(), nullable=False),
        sa.Column("base_model_hash", sa.String(length=64), nullable=True),
        sa.Column("model_hash", sa.String(length=64), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("device_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
    )
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rounds_status"), ["status"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("artefact_sha256", sa.String(length=64), nullable=False),
        sa.Column("target_model_hash", sa.String(length=64), nullable=False),
        sa.Column("final_model_hash", sa.String(length=64), nullable=False),
        sa.Column("bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("completed", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["artefact_sha256"],
            ["artefacts.sha256"],
            name=op.f("fk_deliveries_artefact_sha256_artefacts"),
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_deliveries_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint("device_id", "artefact_sha256", name="uq_deliveries_device_artefact"),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deliveries_device_id"), ["device_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_deliveries_final_model_hash"), ["final_model_hash"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_deliveries_target_model_hash"), ["target_model_hash"], unique=False
        )

    op.create_table(
        "model_versions",
        sa.Column("model_hash", sa.String(length=64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("parent_hash", sa.String(length=64), nullable=True),
        sa.Column("arch_json", sa.Text(), nullable=False),
        sa.Column("full_artefact_sha256", sa.String(length=64), nullable=False),
        sa.Column("round_id", sa.String(length=32), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("reinit_seed", sa.BigInteger(), nullable=True),
        sa.Column("fleet_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["full_artefact_sha256"],
            ["artefacts.sha256"],
            name=op.f("fk_model_versions_full_artefact_sha256_artefacts"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_hash"],
            ["model_versions.model_hash"],
            name=op.f("fk_model_versions_parent_hash_model_versions"),
        ),
        sa.PrimaryKeyConstraint("model_hash", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("number", name=op.f("uq_model_versions_number")),
    )
    op.create_table(
        "samples",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("sample_id", sa.String(length=64), nullable=False),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_samples_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        sa.UniqueConstraint("device_id", "sample_id", name="uq_samples_device_sample"),
    )
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_samples_device_id"), ["device_id"], unique=False)
        batch_op.create_index("ix_samples_label", ["label"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_index("ix_samples_label")
        batch_op.drop_index(batch_op.f("ix_samples_device_id"))

    op.drop_table("samples")
    op.drop_table("model_versions")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_target_model_hash"))
        batch_op.drop_index(batch_op.f("ix_deliveries_final_model_hash"))
        batch_op.drop_index(batch_op.f("ix_deliveries_device_id"))

    op.drop_table("deliveries")
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rounds_status"))

    op.drop_table("rounds")
    op.drop_table("devices")
    with op.batch_alter_table("artefacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artefacts_target_model_hash"))
        batch_op.drop_index(batch_op.f("ix_artefacts_base_model_hash"))

    op.drop_table("artefacts")
