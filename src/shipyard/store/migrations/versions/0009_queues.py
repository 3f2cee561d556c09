"""queues: quotas, cohorts and fair-share weights (``shipyard queues``)

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queues",
        sa.Column("name", sa.String(length=128), primary_key=True),
        sa.Column("cohort", sa.String(length=128), nullable=True),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("nominal", sa.JSON(), nullable=False),
        sa.Column("borrowing_limit", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("queues")
