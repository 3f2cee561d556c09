"""Every table takes a row with every column set and hands it back unchanged, on each backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from shipyard.store import open_database
from shipyard.store.tables import (
    AliasEventRow,
    AuditEventRow,
    Base,
    BlobRefRow,
    CheckpointFileRow,
    CheckpointRow,
    DatasetRow,
    DatasetTagRow,
    DatasetTransformRow,
    DatasetVersionRow,
    DeploymentReplicaRow,
    DeploymentRow,
    JobRow,
    LineageEdgeRow,
    LockRow,
    MetricRow,
    ModelAliasRow,
    ModelRow,
    ModelVersionRow,
    PrincipalRow,
    ProjectMemberRow,
    ProjectRow,
    QueueRow,
    RunArtifactRow,
    RunRow,
    TokenRow,
    aware,
)

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
BIG = 2**40  # past 32 bits: BigInteger columns must hold it
TEXT = "naïve — 日本語 ✓ 'quoted' \"double\""
JSON_DOC: dict[str, Any] = {"a": [1, 2.5, None, True], "b": {"c": TEXT}, "empty": {}}


def full_rows() -> list[Base]:
    """One row per table, parents first, with every column given a non-default value."""
    return [
        ProjectRow(id="p1", name="alpha", created_at=T0),
        DatasetRow(id="d1", project_id="p1", name="faces", created_at=T0),
        DatasetVersionRow(
            id="dv1",
            dataset_id="d1",
            version=3,
            manifest_digest="m" * 64,
            file_count=7,
            total_bytes=BIG,
            new_bytes=BIG - 1,
            profile=JSON_DOC,
            validation=[{"check": "x"}],
            message=TEXT,
            created_at=T0,
            created_by="alice",
            deleted_at=T0 + timedelta(days=1),
            deleted_by="bob",
        ),
        DatasetTagRow(
            dataset_id="d1", tag="golden", version_id="dv1", created_at=T0, created_by="alice"
        ),
        DatasetTransformRow(
            key="k" * 64,
            project_id="p1",
            input_version_id="dv0",
            code_hash="c" * 64,
            params=JSON_DOC,
            output_version_id="dv1",
            created_at=T0,
        ),
        RunRow(
            id="r1",
            project_id="p1",
            name="run one",
            status="finished",
            params={"lr": "0.1"},
            tags={"k": TEXT},
            job_id="j1",
            created_at=T0,
            finished_at=T0 + timedelta(hours=1),
            heartbeat_at=T0 + timedelta(minutes=30),
        ),
        MetricRow(id=BIG, run_id="r1", key="loss", value=0.125, step=BIG, timestamp=1.5e9),
        RunArtifactRow(id=5, run_id="r1", path="a/b.parquet", digest="d" * 64, size=BIG),
        CheckpointRow(
            id="c1",
            run_id="r1",
            number=3,
            kind="folder",
            digest="c" * 64,
            size=BIG,
            step=BIG,
            attempt=2,
            created_at=T0,
        ),
        CheckpointFileRow(
            id=6, checkpoint_id="c1", path="ckpt/weights.npy", digest="6" * 64, size=BIG
        ),
        ModelRow(id="m1", project_id="p1", name="digits", created_at=T0),
        ModelVersionRow(
            id="mv1",
            model_id="m1",
            version=2,
            format="onnx",
            artifact_digest="a" * 64,
            artifact_size=BIG,
            signature=JSON_DOC,
            metrics={"acc": 0.98},
            source_run_id="r1",
            description=TEXT,
            created_at=T0,
        ),
        ModelAliasRow(model_id="m1", alias="production", version=2),
        AliasEventRow(
            id=6,
            model_id="m1",
            alias="production",
            version=2,
            previous_version=1,
            actor="bob",
            at=T0,
        ),
        JobRow(
            id="j1",
            project_id="p1",
            name="train",
            spec=JSON_DOC,
            status="running",
            priority=-5,
            cpus=2.5,
            memory_mb=2048,
            gpus=1,
            code_digest="c" * 64,
            run_id="r1",
            assigned_gpus=[0, 3],
            exit_code=-9,
            message=TEXT,
            usage={"cpu_seconds": 1.25},
            cancel_requested=True,
            created_at=T0,
            started_at=T0,
            finished_at=T0 + timedelta(seconds=1),
            created_by="carol",
            enforcement="rlimit: RLIMIT_AS 1088 MB; affinity: 1 of 2 cpus",
            executor="ray",
            executor_ref={"actor": "job-j1-2", "pids": [4242, 4343], "started": 1.7e9},
            attempt=2,
            preemptions=1,
            queue="vision",
            workers=2,
            gpu_units=2.0,
            preemptible=True,
            preempt_requested=True,
            placement=[{"node_id": "n1", "gpus": [0, 3], "gpu_share": 0.0}],
            attained_gpu_s=3600.5,
            outputs=["model.pt"],
            lock_token="t" * 64,
            lock_expires_at=T0 + timedelta(seconds=60),
        ),
        DeploymentRow(
            id="dep1",
            project_id="p1",
            name="digits-api",
            model_id="m1",
            alias="production",
            version=2,
            status="running",
            url="http://127.0.0.1:9000",
            pid=777,
            pid_started=1.7e9,
            message=TEXT,
            created_at=T0,
            created_by="dave",
            spec={"targets": [{"ref": "production", "weight": 100, "shadow": False}]},
            serving=[{"version": 2, "weight": 100}],
            rollout={"from": [1], "to": [2], "error": None},
        ),
        DeploymentReplicaRow(
            id="rep1",
            deployment_id="dep1",
            version=2,
            url="http://127.0.0.1:9001",
            pid=778,
            create_time=1.7e9,
            state="ready",
            restarts=3,
            next_restart_at=T0 + timedelta(seconds=8),
            message=TEXT,
            started_at=T0,
            ready_at=T0 + timedelta(seconds=2),
            drain_until=T0 + timedelta(seconds=4),
            log_offset=12345,
        ),
        LineageEdgeRow(
            id=8,
            source_kind="dataset_version",
            source_id="dv1",
            target_kind="run",
            target_id="r1",
            relation="input",
            created_at=T0,
        ),
        AuditEventRow(
            seq=9,
            at=T0,
            actor="erin",
            action="test.write",
            resource="test/1",
            details=JSON_DOC,
            prev_hash="0" * 64,
            hash="f" * 64,
        ),
        PrincipalRow(
            id="u1",
            name="alice",
            kind="job",
            server_admin=True,
            job_id="j1",
            run_id="r1",
            created_at=T0,
            disabled_at=T0 + timedelta(days=2),
        ),
        ProjectMemberRow(project_id="p1", principal_id="u1", role="editor", created_at=T0),
        BlobRefRow(project_id="p1", digest="b" * 64, created_at=T0),
        TokenRow(
            id="t1",
            name="ci",
            prefix="shp_abcdef",
            token_hash="e" * 64,
            created_at=T0,
            last_used_at=T0 + timedelta(days=1),
            principal_id="u1",
            project="alpha",
            role="viewer",
            expires_at=T0 + timedelta(days=30),
            revoked_at=T0 + timedelta(days=3),
        ),
        QueueRow(
            name="vision",
            cohort="research",
            weight=2.5,
            nominal={"gpus": 8, "cpus": 64.5, "memory_mb": BIG, "gpus_by_model": {"A100": 4}},
            borrowing_limit={"gpus": 4},
            created_at=T0,
            updated_at=T0 + timedelta(hours=1),
        ),
        LockRow(name="test-lock", holder="pid:1", acquired_at=1.7e9 + 0.25),
    ]


def columns_of(row: Base) -> dict[str, Any]:
    values = {c.key: getattr(row, c.key) for c in row.__table__.columns}
    return {k: aware(v) if isinstance(v, datetime) else v for k, v in values.items()}


def test_every_table_round_trips_a_full_row(db_url: str) -> None:
    db = open_database(db_url)
    rows = full_rows()
    assert {r.__tablename__ for r in rows} == set(Base.metadata.tables)  # none forgotten
    expected = {type(r): columns_of(r) for r in rows}
    with db.transaction() as s:
        for row in rows:  # no ORM relationships to order the inserts: flush in order
            s.add(row)
            s.flush()

    with db.read() as s:
        for cls, columns in expected.items():
            pk = cls.__table__.primary_key.columns.keys()
            stored = s.scalars(
                select(cls).where(*(getattr(cls, k) == columns[k] for k in pk))
            ).one()
            assert columns_of(stored) == columns, cls.__name__


def test_datetimes_come_back_as_the_same_instant_in_utc(db_url: str) -> None:
    db = open_database(db_url)
    elsewhere = datetime(2026, 1, 1, 12, 0, 0, 500, tzinfo=timezone(timedelta(hours=-5)))
    with db.transaction() as s:
        s.add(ProjectRow(id="p1", name="alpha", created_at=elsewhere.astimezone(UTC)))
    with db.read() as s:
        stored = aware(s.scalars(select(ProjectRow.created_at).where(ProjectRow.id == "p1")).one())
    assert stored == elsewhere
    assert stored is not None and stored.utcoffset() == timedelta(0)
