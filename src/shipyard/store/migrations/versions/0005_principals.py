"""principals, project members, token ownership and lifecycle

Tokens created before this revision could do everything; they are given to one server-admin
user, ``admin``, so they keep working (narrow or revoke them with ``shipyard token``).

Revision ID: 0005
Revises: 0004
"""

import datetime
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LEGACY_ADMIN = "admin"


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("server_admin", sa.Boolean(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("principals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_principals_job_id"), ["job_id"], unique=False)

    op.create_table(
        "project_members",
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("principal_id", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["principal_id"], ["principals.id"]),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("project_id", "principal_id"),
    )

    op.create_table(
        "blob_refs",
        sa.Column("project_id", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("project_id", "digest"),
    )
    # what the records already name (dataset files sit inside manifests: server admins read them)
    op.execute(
        """
        INSERT INTO blob_refs (project_id, digest, created_at)
        SELECT DISTINCT project_id, digest, CURRENT_TIMESTAMP FROM (
            SELECT r.project_id AS project_id, a.digest AS digest
              FROM run_artifacts a JOIN runs r ON r.id = a.run_id
            UNION SELECT m.project_id, v.artifact_digest
              FROM model_versions v JOIN models m ON m.id = v.model_id
            UNION SELECT d.project_id, v.manifest_digest
              FROM dataset_versions v JOIN datasets d ON d.id = v.dataset_id
            UNION SELECT j.project_id, j.code_digest FROM jobs j WHERE j.code_digest IS NOT NULL
        ) AS named
        """
    )

    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("principal_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("project", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_tokens_principal_id"), ["principal_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_tokens_principal_id_principals", "principals", ["principal_id"], ["id"]
        )

    bind = op.get_bind()
    tokens = sa.table("tokens", sa.column("id", sa.String), sa.column("principal_id", sa.String))
    principals = sa.table(
        "principals",
        sa.column("id", sa.String),
        sa.column("name", sa.String),
        sa.column("kind", sa.String),
        sa.column("server_admin", sa.Boolean),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    if bind.execute(sa.select(tokens.c.id).limit(1)).first() is not None:
        admin_id = uuid.uuid4().hex[:16]
        op.bulk_insert(
            principals,
            [
                {
                    "id": admin_id,
                    "name": LEGACY_ADMIN,
                    "kind": "user",
                    "server_admin": True,
                    "created_at": datetime.datetime.now(datetime.UTC),
                }
            ],
        )
        op.execute(tokens.update().values(principal_id=admin_id))


def downgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_constraint("fk_tokens_principal_id_principals", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_tokens_principal_id"))
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("role")
        batch_op.drop_column("project")
        batch_op.drop_column("principal_id")
    op.drop_table("project_members")
    op.drop_table("blob_refs")
    with op.batch_alter_table("principals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_principals_job_id"))
    op.drop_table("principals")
