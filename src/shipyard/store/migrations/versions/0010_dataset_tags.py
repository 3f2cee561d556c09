"""dataset versions: tags, soft delete; transforms' cache

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dataset_versions") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deleted_by", sa.String(length=128), nullable=True))
    op.create_table(
        "dataset_tags",
        sa.Column("dataset_id", sa.String(length=32), sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.Column(
            "version_id", sa.String(length=32), sa.ForeignKey("dataset_versions.id"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("dataset_id", "tag"),
    )
    op.create_table(
        "dataset_transforms",
        sa.Column("key", sa.String(length=64), primary_key=True),
        sa.Column("project_id", sa.String(length=32), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("input_version_id", sa.String(length=32), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("output_version_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dataset_transforms")
    op.drop_table("dataset_tags")
    with op.batch_alter_table("dataset_versions") as batch:
        batch.drop_column("deleted_by")
        batch.drop_column("deleted_at")
