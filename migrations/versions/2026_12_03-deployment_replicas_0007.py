"""deployment replicas: each inference replica's own load state per deployment, and the replicas that are up

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployment_replicas",
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("replica_id", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("load_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_deployment_replicas_deployment_id_deployments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("deployment_id", "replica_id", name=op.f("pk_deployment_replicas")),
    )
    with op.batch_alter_table("deployment_replicas", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deployment_replicas_replica_id"), ["replica_id"], unique=False)
    op.create_table(
        "inference_replicas",
        sa.Column("replica_id", sa.String(length=128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("replica_id", name=op.f("pk_inference_replicas")),
    )


def downgrade() -> None:
    op.drop_table("inference_replicas")
    with op.batch_alter_table("deployment_replicas", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployment_replicas_replica_id"))
    op.drop_table("deployment_replicas")
