"""tracking: run heartbeats, non-finite metric values

``runs.heartbeat_at`` is the last sign of life from the SDK logging to a run (a run whose
heartbeat stops is marked crashed), indexed by status for that sweep. ``metrics.value`` becomes
nullable: NULL is how NaN is stored (SQLite turns NaN into NULL anyway).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_runs_status", ["status"], unique=False)
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.alter_column("value", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    metrics = sa.table("metrics", sa.column("value", sa.Float()))
    op.execute(metrics.delete().where(metrics.c.value.is_(None)))  # NaN has no place to go
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.alter_column("value", existing_type=sa.Float(), nullable=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_status")
        batch_op.drop_column("heartbeat_at")
