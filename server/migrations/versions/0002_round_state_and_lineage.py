"""round state in its own table, cohort lineage, several workers, device rollbacks

- ``policy_states``: each update policy's carried state per (lineage, method), with a
  generation for optimistic concurrency (server/training/state_store.py).
- ``model_versions.lineage``, ``rounds.lineage`` and ``rounds.data_scope``: rounds build on
  their cohort's own head (server/domain/lineage.py).
- ``rounds.worker_id`` and ``rounds.heartbeat_at``: a restarting worker fails only rounds
  whose worker is gone; a unique partial index keeps one running round per lineage.
- ``devices.rollbacks``: the versions the agent rolled back after probation (its update
  lifecycle state is the heartbeat's ``state``, already stored).

Upgrading: existing rows get lineage "all" (every round so far built on the one newest
version); rounds still running are failed as interrupted (no worker owns them). Carried state restarts after the upgrade: the old ``carry_sha256`` blobs named in
round metrics are not imported, so the first DPU round of each lineage starts without a
shadow chain or residual (it costs accuracy of that one round, never correctness).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 15:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ACTIVE = sa.text("status IN ('training', 'publishing')")


def upgrade() -> None:
    op.create_table(
        "policy_states",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("lineage", sa.String(length=96), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("schema", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.String(length=32), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=True),
        sa.Column("tensors_sha256", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_states")),
        sa.UniqueConstraint("lineage", "method", name="uq_policy_states_lineage_method"),
    )
    with op.batch_alter_table("policy_states", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_policy_states_tensors_sha256"), ["tensors_sha256"], unique=False
        )

    # Server defaults fill the rows that already exist.
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lineage", sa.String(length=96), nullable=False, server_default="all")
        )
        batch_op.create_index(batch_op.f("ix_model_versions_lineage"), ["lineage"], unique=False)

    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lineage", sa.String(length=96), nullable=False, server_default="all")
        )
        batch_op.add_column(
            sa.Column("data_scope", sa.String(length=16), nullable=False, server_default="cohort")
        )
        batch_op.add_column(
            sa.Column("worker_id", sa.String(length=128), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    # A round left running names no worker, so start-up would fail it anyway; failing it now
    # keeps two of them (both lineage "all") from breaking the unique index below.
    op.execute(
        "UPDATE rounds SET status = 'failed', finished_at = CURRENT_TIMESTAMP, "
        "reason = 'interrupted: still running when the database was upgraded' "
        "WHERE status IN ('training', 'publishing')"
    )
    # Outside the batch: SQLite's table rebuild would drop the WHERE of a partial index.
    op.create_index(
        "uq_rounds_active_lineage",
        "rounds",
        ["lineage"],
        unique=True,
        postgresql_where=_ACTIVE,
        sqlite_where=_ACTIVE,
    )

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("rollbacks", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("rollbacks")

    op.drop_index("uq_rounds_active_lineage", table_name="rounds")
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("worker_id")
        batch_op.drop_column("data_scope")
        batch_op.drop_column("lineage")

    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_lineage"))
        batch_op.drop_column("lineage")

    with op.batch_alter_table("policy_states", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_policy_states_tensors_sha256"))

    op.drop_table("policy_states")
