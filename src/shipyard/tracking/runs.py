"""Runs: params, metrics, tags, artifacts and inputs of one training or evaluation run.

Metrics arrive in batches (the SDK buffers them), and a batch is one transaction with one bulk
insert, so logging from a training loop costs one round-trip per batch rather than per point.
Params are write-once, as in MLflow: logging the same key again with another value is an error,
because a run whose params changed midway cannot be reproduced.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from shipyard.context import Context, new_id
from shipyard.domain.models import Artifact, MetricPoint, Run, RunStatus
from shipyard.domain.names import validate_name, validate_relative_path
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError
from shipyard.security import audit
from shipyard.store.queries import add_edge, project_id, project_names
from shipyard.store.tables import (
    DatasetRow,
    DatasetVersionRow,
    MetricRow,
    ProjectRow,
    RunArtifactRow,
    RunRow,
    aware,
    utcnow,
)

MAX_KEY_LEN = 250
MAX_VALUE_LEN = 6000
MAX_BATCH = 10_000


def create_run(
    ctx: Context,
    *,
    project: str,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> Run:
    run_id = new_id()
    clean_params = _clean_mapping(params or {}, field="params")
    clean_tags = _clean_mapping(tags or {}, field="tags")
    if name is not None:
        validate_name(name, field="name")
    with ctx.db.transaction() as s:
        pid = project_id(s, project, create=True)
        row = RunRow(
            id=run_id,
            project_id=pid,
            name=name or f"run-{run_id[:8]}",
            status=RunStatus.RUNNING.value,
            params=clean_params,
            tags=clean_tags,
            job_id=job_id,
        )
        s.add(row)
        audit.record(
            s, actor=ctx.actor, action="run.create", resource=f"project/{project}/run/{run_id}"
        )
        s.flush()
        return _to_domain(s, row, project)


def get_run(ctx: Context, *, run_id: str) -> Run:
    with ctx.db.read() as s:
        row = _require(s, run_id)
        return _to_domain(s, row, _project_name(s, row.project_id))


def list_runs(ctx: Context, *, project: str | None = None, limit: int = 100) -> list[Run]:
    with ctx.db.read() as s:
        query = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
        if project is not None:
            query = query.where(RunRow.project_id == project_id(s, project, create=False))
        rows = list(s.scalars(query))
        names = project_names(s)
        latest = _latest_metrics(s, [r.id for r in rows])
        return [_to_domain(s, r, names[r.project_id], latest.get(r.id, {})) for r in rows]


def log_batch(
    ctx: Context,
    *,
    run_id: str,
    metrics: list[MetricPoint] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> int:
    """Append metric points and merge params and tags in one transaction; returns points stored."""
    metrics = metrics or []
    if len(metrics) > MAX_BATCH:
        raise InvalidInputError(
            f"a batch holds at most {MAX_BATCH} metric points, got {len(metrics)}; split it",
            field="metrics",
        )
    for point in metrics:
        _check_key(point.key, field="metrics.key")
        if point.step < 0:
            raise InvalidInputError(
                f"metric {point.key!r} has a negative step", field="metrics.step"
            )
    clean_params = _clean_mapping(params or {}, field="params")
    clean_tags = _clean_mapping(tags or {}, field="tags")
    with ctx.db.transaction() as s:
        row = _require(s, run_id)
        if row.status != RunStatus.RUNNING.value:
            raise InvalidStateError(
                f"run {run_id} is {row.status}; only a running run accepts logging", field="run_id"
            )
        if clean_params:
            merged = dict(row.params)
            for key, value in clean_params.items():
                if key in merged and merged[key] != value:
                    raise InvalidInputError(
                        f"param {key!r} is already {merged[key]!r}; params cannot change within a "
                        "run (log it as a metric or tag, or start a new run)",
                        field="params",
                    )
                merged[key] = value
            row.params = merged
        if clean_tags:
            row.tags = {**row.tags, **clean_tags}
        if metrics:
            s.execute(
                insert(MetricRow),
                [
                    {
                        "run_id": run_id,
                        "key": p.key,
                        "value": p.value,
                        "step": p.step,
                        "timestamp": p.timestamp,
                    }
                    for p in metrics
                ],
            )
    return len(metrics)


def finish_run(ctx: Context, *, run_id: str, status: RunStatus = RunStatus.FINISHED) -> Run:
    if status == RunStatus.RUNNING:
        raise InvalidInputError(
            "a run can only be finished as finished, failed or killed", field="status"
        )
    with ctx.db.transaction() as s:
        row = _require(s, run_id)
        if row.status != RunStatus.RUNNING.value:
            if row.status == status.value:
                return _to_domain(s, row, _project_name(s, row.project_id))
            raise InvalidStateError(f"run {run_id} is already {row.status}", field="status")
        row.status = status.value
        row.finished_at = utcnow()
        project = _project_name(s, row.project_id)
        audit.record(
            s,
            actor=ctx.actor,
            action="run.finish",
            resource=f"project/{project}/run/{run_id}",
            details={"status": status.value},
        )
        return _to_domain(s, row, project)


def metric_history(ctx: Context, *, run_id: str, key: str) -> list[MetricPoint]:
    with ctx.db.read() as s:
        _require(s, run_id)
        rows = s.execute(
            select(MetricRow.key, MetricRow.value, MetricRow.step, MetricRow.timestamp)
            .where(MetricRow.run_id == run_id, MetricRow.key == key)
            .order_by(MetricRow.step, MetricRow.id)
        ).all()
        return [MetricPoint(key=k, value=v, step=st, timestamp=ts) for k, v, st, ts in rows]


def log_artifact(ctx: Context, *, run_id: str, path: str, digest: str, size: int) -> Artifact:
    """Record a stored blob as one of the run's artifacts, under a relative ``path``."""
    validate_relative_path(path, field="path")
    if not ctx.blobs.exists(digest):
        raise NotFoundError(
            f"blob {digest} is not stored; upload it before recording it", field="digest"
        )
    actual = ctx.blobs.size(digest)
    if actual != size:
        raise InvalidInputError(
            f"artifact size {size} does not match the stored blob ({actual})", field="size"
        )
    with ctx.db.transaction() as s:
        row = _require(s, run_id)
        existing = s.scalar(
            select(RunArtifactRow).where(
                RunArtifactRow.run_id == run_id, RunArtifactRow.path == path
            )
        )
        if existing is not None:
            existing.digest, existing.size = digest, size
        else:
            s.add(RunArtifactRow(run_id=run_id, path=path, digest=digest, size=size))
        audit.record(
            s,
            actor=ctx.actor,
            action="run.log_artifact",
            resource=f"project/{_project_name(s, row.project_id)}/run/{run_id}",
            details={"path": path, "digest": digest},
        )
    return Artifact(path=path, digest=digest, size=size)


def get_artifact(ctx: Context, *, run_id: str, path: str) -> Artifact:
    validate_relative_path(path, field="path")
    with ctx.db.read() as s:
        _require(s, run_id)
        row = s.scalar(
            select(RunArtifactRow).where(
                RunArtifactRow.run_id == run_id, RunArtifactRow.path == path
            )
        )
        if row is None:
            raise NotFoundError(f"run {run_id} has no artifact {path!r}", field="path")
        return Artifact(path=row.path, digest=row.digest, size=row.size)


def add_input(ctx: Context, *, run_id: str, project: str, dataset: str, version: int) -> None:
    """Record that the run read a dataset version: the lineage edge dataset_version -> run."""
    with ctx.db.transaction() as s:
        _require(s, run_id)
        pid = project_id(s, project, create=False)
        dv_id = s.scalar(
            select(DatasetVersionRow.id)
            .join(DatasetRow, DatasetRow.id == DatasetVersionRow.dataset_id)
            .where(
                DatasetRow.project_id == pid,
                DatasetRow.name == dataset,
                DatasetVersionRow.version == version,
            )
        )
        if dv_id is None:
            raise NotFoundError(
                f"dataset {dataset!r} has no version {version} in project {project!r}",
                field="dataset",
            )
        add_edge(
            s,
            source_kind="dataset_version",
            source_id=dv_id,
            target_kind="run",
            target_id=run_id,
            relation="input",
        )
        audit.record(
            s,
            actor=ctx.actor,
            action="run.add_input",
            resource=f"project/{project}/run/{run_id}",
            details={"dataset": dataset, "version": version},
        )


# --- helpers ------------------------------------------------------------------------------------


def _require(s: Session, run_id: str) -> RunRow:
    row = s.get(RunRow, run_id) if isinstance(run_id, str) else None
    if row is None:
        raise NotFoundError(f"run {run_id!r} does not exist", field="run_id")
    return row


def _project_name(s: Session, pid: str) -> str:
    return s.scalar(select(ProjectRow.name).where(ProjectRow.id == pid)) or "?"


def _check_key(key: str, *, field: str) -> None:
    if (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_KEY_LEN
        or any(ord(c) < 32 for c in key)
    ):
        raise InvalidInputError(
            f"{field} {key!r} must be 1-{MAX_KEY_LEN} printable characters", field=field
        )


def _clean_mapping(values: dict[str, Any], *, field: str) -> dict[str, str]:
    clean: dict[str, str] = {}
    for key, value in values.items():
        _check_key(key, field=field)
        text = (
            value
            if isinstance(value, str)
            else repr(value)
            if isinstance(value, float)
            else str(value)
        )
        if len(text) > MAX_VALUE_LEN:
            raise InvalidInputError(
                f"{field}[{key!r}] is longer than {MAX_VALUE_LEN} characters", field=field
            )
        clean[key] = text
    return clean


def _latest_metrics(s: Session, run_ids: list[str]) -> dict[str, dict[str, float]]:
    if not run_ids:
        return {}
    ranked = (
        select(
            MetricRow.run_id,
            MetricRow.key,
            MetricRow.value,
            func.row_number()
            .over(
                partition_by=(MetricRow.run_id, MetricRow.key),
                order_by=(MetricRow.step.desc(), MetricRow.id.desc()),
            )
            .label("rank"),
        )
        .where(MetricRow.run_id.in_(run_ids))
        .subquery()
    )
    out: dict[str, dict[str, float]] = {}
    for run_id, key, value in s.execute(
        select(ranked.c.run_id, ranked.c.key, ranked.c.value).where(ranked.c.rank == 1)
    ):
        out.setdefault(run_id, {})[key] = value
    return out


def latest_metrics(s: Session, run_id: str) -> dict[str, float]:
    return _latest_metrics(s, [run_id]).get(run_id, {})


def _to_domain(
    s: Session, row: RunRow, project: str, metrics: dict[str, float] | None = None
) -> Run:
    artifacts = [
        Artifact(path=a.path, digest=a.digest, size=a.size)
        for a in s.scalars(
            select(RunArtifactRow)
            .where(RunArtifactRow.run_id == row.id)
            .order_by(RunArtifactRow.path)
        )
    ]
    return Run(
        id=row.id,
        project=project,
        name=row.name,
        status=RunStatus(row.status),
        params=dict(row.params),
        tags=dict(row.tags),
        metrics=metrics if metrics is not None else latest_metrics(s, row.id),
        artifacts=artifacts,
        job_id=row.job_id,
        created_at=aware(row.created_at) or utcnow(),
        finished_at=aware(row.finished_at),
    )
