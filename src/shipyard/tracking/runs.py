"""Runs: params, metrics, tags, artifacts and inputs of one training or evaluation run.

Metrics arrive in batches (the SDK buffers them), and a batch is one transaction with one bulk
insert, so logging from a training loop costs one round-trip per batch rather than per point.
Params are write-once, as in MLflow: logging the same key again with another value is an error,
because a run whose params changed midway cannot be reproduced.

A metric value is any real number, NaN and the infinities included (NaN is stored as NULL); a
point that cannot be stored (a string value, a bad key or step) is rejected on its own and named
in the result, and the rest of its batch is stored (``shipyard.domain.metrics``).

Liveness: the SDK's sender beats (:func:`heartbeat`, and every batch counts as one). A running
run whose heartbeat is older than the grace period (``SHIPYARD_RUN_GRACE_S``, default 60 s) is
marked ``crashed`` by :func:`mark_crashed_runs`, which the server calls in the background and the
embedded home calls when runs are read or created. A heartbeat or a batch from a crashed run's
process (one that was only cut off for a while) revives it: nothing it logs is refused.
Artifacts are immutable once a run has ended, so its lineage cannot be rewritten afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from shipyard.context import Context, new_id
from shipyard.domain.metrics import (
    BadMetric,
    PointLike,
    key_problem,
    metric_value,
    step_problem,
    timestamp_problem,
)
from shipyard.domain.models import (
    Artifact,
    LogBatchResult,
    MetricPoint,
    RejectedPoint,
    Run,
    RunStatus,
)
from shipyard.domain.names import validate_name, validate_relative_path
from shipyard.domain.principals import Role
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError
from shipyard.security import audit
from shipyard.security.blobrefs import add_refs, require_refs
from shipyard.security.rbac import authorize, authorize_resource, viewable
from shipyard.store.queries import add_edge, project_id, project_names
from shipyard.store.tables import (
    DatasetRow,
    DatasetVersionRow,
    JobRow,
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
ENV_RUN_GRACE = "SHIPYARD_RUN_GRACE_S"
DEFAULT_RUN_GRACE_S = 60.0
SWEEP_ACTOR = "system:heartbeat"
OPEN_STATUSES = (RunStatus.RUNNING.value, RunStatus.CRASHED.value)


def create_run(
    ctx: Context,
    *,
    project: str,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> Run:
    """Start a run. ``job_id``, when given, must name a job of the same project."""
    run_id = new_id()
    clean_params = _clean_mapping(params or {}, field="params")
    clean_tags = _clean_mapping(tags or {}, field="tags")
    if name is not None:
        validate_name(name, field="name")
    if job_id is not None:
        validate_name(job_id, field="job_id")
    authorize(ctx, project=project, need=Role.EDITOR)
    mark_crashed_runs(ctx)  # a new run is a good moment to settle the ones whose process died
    with ctx.db.transaction() as s:
        pid = project_id(s, project, create=True)
        if job_id is not None:
            job_project = s.scalar(select(JobRow.project_id).where(JobRow.id == job_id))
            if job_project != pid:
                raise NotFoundError(
                    f"job {job_id!r} does not exist in project {project!r}; a run can only be "
                    "linked to a job of its own project (or leave job_id out)",
                    field="job_id",
                )
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
            s,
            actor=ctx.actor,
            action="run.create",
            resource=f"project/{project}/run/{run_id}",
            details={"job_id": job_id} if job_id else None,
        )
        s.flush()
        return _to_domain(s, row, project)


def get_run(ctx: Context, *, run_id: str, project: str | None = None) -> Run:
    mark_crashed_runs(ctx)
    with ctx.db.read() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.VIEWER)
        return _to_domain(s, row, _project_name(s, row.project_id))


def list_runs(ctx: Context, *, project: str | None = None, limit: int = 100) -> list[Run]:
    mark_crashed_runs(ctx)
    with ctx.db.read() as s:
        query = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
        names = project_names(s)
        if project is not None:
            authorize(ctx, project=project, need=Role.VIEWER)
            query = query.where(RunRow.project_id == project_id(s, project, create=False))
        elif not ctx.principal.server_admin:
            allowed = set(viewable(ctx.principal, list(names.values())))
            query = query.where(
                RunRow.project_id.in_([pid for pid, n in names.items() if n in allowed])
            )
        rows = list(s.scalars(query))
        latest = _latest_metrics(s, [r.id for r in rows])
        return [_to_domain(s, r, names[r.project_id], latest.get(r.id, {})) for r in rows]


def log_batch(
    ctx: Context,
    *,
    run_id: str,
    metrics: Sequence[PointLike] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    project: str | None = None,
) -> LogBatchResult:
    """Append metric points and merge params and tags in one transaction.

    Returns how many points were stored and which were rejected: a point that cannot be stored
    (its value is not a number, its key or step is bad) is rejected alone, named by key and step,
    and the rest of the batch is stored. Params and tags are checked whole: a bad or conflicting
    one fails the batch and stores nothing. The batch also counts as the run's heartbeat.
    """
    metrics = metrics or []
    if len(metrics) > MAX_BATCH:
        raise InvalidInputError(
            f"a batch holds at most {MAX_BATCH} metric points, got {len(metrics)}; split it",
            field="metrics",
        )
    rows, rejected = _check_points(run_id, metrics)
    clean_params = _clean_mapping(params or {}, field="params")
    clean_tags = _clean_mapping(tags or {}, field="tags")
    with ctx.db.transaction() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
        _require_open(s, row, doing="accepts logging")
        before_params, before_tags = dict(row.params), dict(row.tags)
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
        # audit what changed (params are set once; tags may change), not every batch
        new_params = {k: v for k, v in clean_params.items() if k not in before_params}
        new_tags = {
            k: v for k, v in clean_tags.items() if k not in before_tags or before_tags[k] != v
        }
        if new_params or new_tags:
            audit.record(
                s,
                actor=ctx.actor,
                action="run.log",
                resource=f"project/{_project_name(s, row.project_id)}/run/{run_id}",
                details={"params": new_params, "tags": new_tags},
            )
        row.heartbeat_at = utcnow()
        if rows:  # Core executemany: the ORM's bulk path costs about half again as much
            s.connection().execute(insert(MetricRow), rows)
    return LogBatchResult(stored=len(rows), rejected=rejected)


def heartbeat(ctx: Context, *, run_id: str, project: str | None = None) -> RunStatus:
    """Record a sign of life from the process logging to the run (the SDK's sender beats every
    few seconds); returns the run's status. A crashed run beats back to running. Cheap: one row
    update, no read of the run's metrics."""
    with ctx.db.transaction() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
        _require_open(s, row, doing="takes heartbeats")
        row.heartbeat_at = utcnow()
        return RunStatus(row.status)


def mark_crashed_runs(ctx: Context, *, grace_s: float | None = None) -> list[str]:
    """Mark ``crashed`` every running run whose last heartbeat is older than the grace period
    (default :func:`run_grace_s`); returns their ids. Runs that never had a heartbeat (a run
    created for a queued job, whose process has not started) are left alone.

    Cheap when there is nothing to do: one indexed read, no write transaction.
    """
    grace = run_grace_s(ctx) if grace_s is None else grace_s
    cutoff = utcnow() - timedelta(seconds=grace)
    stale = (
        RunRow.status == RunStatus.RUNNING.value,
        RunRow.heartbeat_at.is_not(None),
        RunRow.heartbeat_at < cutoff,
    )
    with ctx.db.read() as s:
        if s.scalar(select(RunRow.id).where(*stale).limit(1)) is None:
            return []
    crashed: list[str] = []
    with ctx.db.transaction() as s:
        names = project_names(s)
        for row in s.scalars(select(RunRow).where(*stale)):
            row.status = RunStatus.CRASHED.value
            row.finished_at = aware(row.heartbeat_at)
            crashed.append(row.id)
            audit.record(
                s,
                actor=SWEEP_ACTOR,
                action="run.crash",
                resource=f"project/{names.get(row.project_id, '?')}/run/{row.id}",
                details={"last_heartbeat": _iso(row.heartbeat_at), "grace_s": grace},
            )
    return crashed


def run_grace_s(ctx: Context) -> float:
    """How long a run may go without a heartbeat before it is marked crashed:
    ``SHIPYARD_RUN_GRACE_S`` (in the settings' ``extra`` or the environment), default 60 s."""
    raw = ctx.settings.extra.get(ENV_RUN_GRACE) or os.environ.get(ENV_RUN_GRACE, "")
    return parse_grace(raw)


def parse_grace(raw: str | None) -> float:
    """A grace period in seconds from its text (empty: the default)."""
    if raw is None or not raw.strip():
        return DEFAULT_RUN_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInputError(
            f"{ENV_RUN_GRACE}={raw!r} is not a number of seconds", field=ENV_RUN_GRACE
        ) from None
    if not 0 < value < float("inf"):
        raise InvalidInputError(
            f"{ENV_RUN_GRACE}={raw!r} must be a positive number of seconds", field=ENV_RUN_GRACE
        )
    return value


def finish_run(
    ctx: Context,
    *,
    run_id: str,
    status: RunStatus = RunStatus.FINISHED,
    project: str | None = None,
) -> Run:
    if status in (RunStatus.RUNNING, RunStatus.CRASHED):
        raise InvalidInputError(
            "a run can only be finished as finished, failed or killed", field="status"
        )
    with ctx.db.transaction() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
        if row.status not in OPEN_STATUSES:
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


def metric_history(
    ctx: Context, *, run_id: str, key: str, project: str | None = None
) -> list[MetricPoint]:
    with ctx.db.read() as s:
        _require_for(ctx, s, run_id, project=project, need=Role.VIEWER)
        rows = s.execute(
            select(MetricRow.key, MetricRow.value, MetricRow.step, MetricRow.timestamp)
            .where(MetricRow.run_id == run_id, MetricRow.key == key)
            .order_by(MetricRow.step, MetricRow.id)
        ).all()
        return [
            MetricPoint.model_construct(key=k, value=v, step=st, timestamp=ts)
            for k, v, st, ts in rows
        ]


def last_steps(ctx: Context, *, run_id: str, project: str | None = None) -> dict[str, int]:
    """The largest stored step of each of the run's metric keys: where a new attempt of the
    run's job continues its automatic steps from. One indexed aggregate, no values read."""
    with ctx.db.read() as s:
        _require_for(ctx, s, run_id, project=project, need=Role.VIEWER)
        rows = s.execute(
            select(MetricRow.key, func.max(MetricRow.step))
            .where(MetricRow.run_id == run_id)
            .group_by(MetricRow.key)
        ).all()
        return {key: int(step) for key, step in rows}


def log_artifact(
    ctx: Context,
    *,
    run_id: str,
    path: str,
    digest: str,
    size: int,
    project: str | None = None,
    after_end: bool = False,
) -> Artifact:
    """Record a stored blob as one of the run's artifacts, under a relative ``path``.

    Only a running run takes artifacts: once it has ended they are immutable, so what a model
    version's lineage points at cannot be swapped afterwards. ``after_end`` (a job's declared
    outputs, stored by its executor once the job's process - which may have finished the run -
    is gone): an ended run still takes a path it does not hold yet, never a replacement.
    """
    validate_relative_path(path, field="path")
    with ctx.db.read() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
        if not after_end:
            _require_running(row, doing="takes artifacts")
        owner = _project_name(s, row.project_id)
    require_refs(ctx, project=owner, digests=[digest], field="digest")
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
        row = _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
        if not after_end:
            _require_running(row, doing="takes artifacts")
        add_refs(s, project_pk=row.project_id, digests=[digest])
        existing = s.scalar(
            select(RunArtifactRow).where(
                RunArtifactRow.run_id == run_id, RunArtifactRow.path == path
            )
        )
        if existing is not None and row.status != RunStatus.RUNNING.value:
            if existing.digest == digest and existing.size == size:
                return Artifact(path=path, digest=digest, size=size)  # already there: a no-op
            raise InvalidStateError(
                f"run {run_id} is {row.status} and already has artifact {path!r}; an ended "
                "run's artifacts are never replaced",
                field="path",
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


def get_artifact(ctx: Context, *, run_id: str, path: str, project: str | None = None) -> Artifact:
    validate_relative_path(path, field="path")
    with ctx.db.read() as s:
        _require_for(ctx, s, run_id, project=project, need=Role.VIEWER)
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
        _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
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


def _require_for(
    ctx: Context, s: Session, run_id: str, *, project: str | None, need: Role
) -> RunRow:
    """The run, once the caller may act on it with ``need`` (in ``project`` when given)."""
    row = _require(s, run_id)
    authorize_resource(
        ctx,
        project=_project_name(s, row.project_id),
        given=project,
        need=need,
        missing=NotFoundError(f"run {run_id!r} does not exist", field="run_id"),
        run_id=run_id,
    )
    return row


def _require_open(s: Session, row: RunRow, *, doing: str) -> None:
    """A running run, or a crashed one, which this sign of life revives."""
    if row.status == RunStatus.CRASHED.value:
        row.status = RunStatus.RUNNING.value
        row.finished_at = None
        audit.record(
            s,
            actor=SWEEP_ACTOR,
            action="run.revive",
            resource=f"project/{_project_name(s, row.project_id)}/run/{row.id}",
            details={"last_heartbeat": _iso(row.heartbeat_at)},
        )
        return
    _require_running(row, doing=doing)


def _require_running(row: RunRow, *, doing: str) -> None:
    if row.status != RunStatus.RUNNING.value:
        raise InvalidStateError(
            f"run {row.id} is {row.status}; only a running run {doing} (start a new run)",
            field="run_id",
        )


def _check_points(
    run_id: str, points: Sequence[PointLike]
) -> tuple[list[dict[str, Any]], list[RejectedPoint]]:
    """Split a batch into insertable rows and rejected points (each with its reason)."""
    rows: list[dict[str, Any]] = []
    rejected: list[RejectedPoint] = []
    key_problems: dict[str, str | None] = {}  # a batch holds few keys, many times each
    for point in points:
        key, step = point.key, point.step
        if isinstance(key, str):
            if key not in key_problems:
                key_problems[key] = key_problem(key)
            problem = key_problems[key]
        else:
            problem = key_problem(key)
        problem = problem or step_problem(step) or timestamp_problem(point.timestamp)
        value = 0.0
        if problem is None:
            try:
                value = metric_value(point.value, wire=True)
            except BadMetric as exc:
                problem = str(exc)
        if problem is not None:
            rejected.append(
                RejectedPoint(
                    key=key if isinstance(key, str) else repr(key)[:MAX_KEY_LEN],
                    step=step if isinstance(step, int) and not isinstance(step, bool) else None,
                    reason=problem,
                )
            )
            continue
        rows.append(
            {
                "run_id": run_id,
                "key": key,
                "value": value,
                "step": step,
                "timestamp": float(point.timestamp),
            }
        )
    return rows, rejected


def _iso(value: Any) -> str | None:
    stamp = aware(value)
    return stamp.isoformat() if stamp is not None else None


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
        heartbeat_at=aware(row.heartbeat_at),
    )
