"""compute: executor references instead of pids, attempts, queues, gangs, leases

Revision ID: 0007
Revises: 0006

Jobs store ``executor`` + ``executor_ref`` (JSON, the executor's own handle) instead of
``supervisor_pid`` / ``supervisor_started`` / ``pid``: those of RUNNING jobs are moved into
``executor_ref`` before the columns go. ``queue`` is backfilled with the project's name,
``gpu_units`` with the job's GPUs, ``placement`` of RUNNING jobs with this machine and their GPUs.
"""

import json
import socket

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# (name, type, value for existing rows); added nullable, filled, then made NOT NULL.
_FILLED = [
    ("executor", sa.String(length=32), "local"),
    ("attempt", sa.Integer(), 1),
    ("preemptions", sa.Integer(), 0),
    ("workers", sa.Integer(), 1),
    ("preemptible", sa.Boolean(), False),
    ("preempt_requested", sa.Boolean(), False),
    ("attained_gpu_s", sa.Float(), 0.0),
]
_JSON_LISTS = ("placement", "outputs")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name, kind, _ in _FILLED:
            batch.add_column(sa.Column(name, kind, nullable=True))
        batch.add_column(sa.Column("executor_ref", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("queue", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("gpu_units", sa.Float(), nullable=True))
        for name in _JSON_LISTS:
            batch.add_column(sa.Column(name, sa.JSON(), nullable=True))
        batch.add_column(sa.Column("lock_token", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("lock_expires_at", sa.DateTime(timezone=True), nullable=True))

    conn = op.get_bind()
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("project_id", sa.String),
        sa.column("status", sa.String),
        sa.column("gpus", sa.Integer),
        sa.column("assigned_gpus", sa.JSON),
        sa.column("supervisor_pid", sa.Integer),
        sa.column("supervisor_started", sa.Float),
        sa.column("pid", sa.Integer),
        sa.column("queue", sa.String),
        sa.column("gpu_units", sa.Float),
        sa.column("placement", sa.JSON),
        sa.column("outputs", sa.JSON),
        sa.column("executor_ref", sa.JSON),
        *(sa.column(name, kind) for name, kind, _ in _FILLED),
    )
    projects = sa.table("projects", sa.column("id", sa.String), sa.column("name", sa.String))
    conn.execute(jobs.update().values({name: value for name, _, value in _FILLED}))
    conn.execute(
        jobs.update().values(
            queue=sa.select(projects.c.name)
            .where(projects.c.id == jobs.c.project_id)
            .scalar_subquery(),
            gpu_units=sa.cast(jobs.c.gpus, sa.Float),
            placement=[],
            outputs=[],
        )
    )
    host = socket.gethostname()
    running = conn.execute(
        sa.select(
            jobs.c.id,
            jobs.c.assigned_gpus,
            jobs.c.supervisor_pid,
            jobs.c.supervisor_started,
            jobs.c.pid,
        ).where(jobs.c.status == "running")
    ).all()
    for job_id, gpus, sup_pid, sup_started, pid in running:
        if isinstance(gpus, str):
            gpus = json.loads(gpus)
        ref = None
        if sup_pid is not None:
            ref = {
                "supervisor_pid": sup_pid,
                "supervisor_started": sup_started,
                "pid": pid,
                "host": host,
            }
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(
                executor_ref=ref,
                placement=[{"node_id": host, "gpus": list(gpus or []), "gpu_share": 0.0}],
            )
        )

    with op.batch_alter_table("jobs") as batch:
        for name, kind, _ in _FILLED:
            batch.alter_column(name, existing_type=kind, nullable=False)
        batch.alter_column("queue", existing_type=sa.String(length=128), nullable=False)
        batch.alter_column("gpu_units", existing_type=sa.Float(), nullable=False)
        for name in _JSON_LISTS:
            batch.alter_column(name, existing_type=sa.JSON(), nullable=False)
        batch.drop_column("supervisor_pid")
        batch.drop_column("supervisor_started")
        batch.drop_column("pid")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("supervisor_pid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("supervisor_started", sa.Float(), nullable=True))
        batch.add_column(sa.Column("pid", sa.Integer(), nullable=True))
    conn = op.get_bind()
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("executor_ref", sa.JSON),
        sa.column("supervisor_pid", sa.Integer),
        sa.column("supervisor_started", sa.Float),
        sa.column("pid", sa.Integer),
    )
    for job_id, ref in conn.execute(sa.select(jobs.c.id, jobs.c.executor_ref)).all():
        if isinstance(ref, str):
            ref = json.loads(ref)
        if isinstance(ref, dict) and ref.get("supervisor_pid") is not None:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(
                    supervisor_pid=ref.get("supervisor_pid"),
                    supervisor_started=ref.get("supervisor_started"),
                    pid=ref.get("pid"),
                )
            )
    with op.batch_alter_table("jobs") as batch:
        for name in (
            "executor",
            "executor_ref",
            "attempt",
            "preemptions",
            "queue",
            "workers",
            "gpu_units",
            "preemptible",
            "preempt_requested",
            "placement",
            "outputs",
            "attained_gpu_s",
            "lock_token",
            "lock_expires_at",
        ):
            batch.drop_column(name)
