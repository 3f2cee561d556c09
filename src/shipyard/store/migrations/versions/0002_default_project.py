"""seed the default project

The default project exists from the start, so reading a fresh home finds it empty rather than
reporting the project itself as missing.

Revision ID: 0002
Revises: 0001
"""

import datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

projects = sa.table(
    "projects",
    sa.column("id", sa.String),
    sa.column("name", sa.String),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    exists = (
        op.get_bind().execute(sa.select(projects.c.id).where(projects.c.name == "default")).first()
    )
    if exists is None:
        op.bulk_insert(
            projects,
            [
                {
                    "id": "default",
                    "name": "default",
                    "created_at": datetime.datetime.now(datetime.UTC),
                }
            ],
        )


def downgrade() -> None:
    op.execute(projects.delete().where(projects.c.id == "default"))
