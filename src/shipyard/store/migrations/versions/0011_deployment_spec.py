"""deployments as desired state: a spec, what serves, the rollout; replica slots

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("spec", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("serving", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("rollout", sa.JSON(), nullable=True))
    op.create_table(
        "deployment_replicas",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column(
            "deployment_id", sa.String(length=32), sa.ForeignKey("deployments.id"), nullable=False
        ),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=256), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("create_time", sa.Float(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("next_restart_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("drain_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_deployment_replicas_deployment", "deployment_replicas", ["deployment_id"])


def downgrade() -> None:
    op.drop_index("ix_deployment_replicas_deployment", table_name="deployment_replicas")
    op.drop_table("deployment_replicas")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("rollout")
        batch.drop_column("serving")
        batch.drop_column("spec")
