"""inference replicas advertise the LoRA rank they serve as adapters

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 17:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Null: the replica serves merged weights (every backend but vLLM), whatever the adapter.
    with op.batch_alter_table("inference_replicas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_lora_rank", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inference_replicas", schema=None) as batch_op:
        batch_op.drop_column("max_lora_rank")
