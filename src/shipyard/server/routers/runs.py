"""Runs (``/projects/{project}/runs``): thin HTTP over ``shipyard.tracking.runs``.

By-id routes carry the project too: a run of another project is a 404, like a missing one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from shipyard.domain.checkpoints import Checkpoint
from shipyard.domain.models import Artifact, FileEntry, MetricPoint, Run
from shipyard.domain.principals import PrincipalKind
from shipyard.errors import PermissionDeniedError
from shipyard.schemas import (
    AddRunInputRequest,
    CreateRunRequest,
    ErrorBody,
    FinishRunRequest,
    LogArtifactRequest,
    LogBatchRequest,
    LogBatchResponse,
    RecordCheckpointRequest,
)
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath, name_path
from shipyard.tracking import checkpoints, runs

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/runs",
    tags=["runs"],
)

RunId = Annotated[str, name_path("The run's id.")]


@router.post("", status_code=201)
def create_run(project: ProjectPath, body: CreateRunRequest, ctx: Ctx) -> Run:
    return runs.create_run(
        ctx,
        project=project,
        name=body.name,
        params=body.params,
        tags=body.tags,
        job_id=body.job_id,
    )


@router.get("")
def list_runs(
    project: ProjectPath,
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[Run]:
    return runs.list_runs(ctx, project=project, limit=limit)


@router.get("/{run_id}")
def get_run(project: ProjectPath, run_id: RunId, ctx: Ctx) -> Run:
    return runs.get_run(ctx, run_id=run_id, project=project)


@router.post("/{run_id}/log-batch", responses={409: {"model": ErrorBody}})
def log_batch(
    project: ProjectPath, run_id: RunId, body: LogBatchRequest, ctx: Ctx
) -> LogBatchResponse:
    """Store a batch. A point that cannot be stored (e.g. a string value) is rejected alone and
    listed in ``rejected`` with its key, step and reason; the rest are stored (200 either way)."""
    result = runs.log_batch(
        ctx,
        run_id=run_id,
        project=project,
        metrics=body.metrics,
        params=body.params,
        tags=body.tags,
    )
    return LogBatchResponse(stored=result.stored, rejected=result.rejected)


@router.post(
    "/{run_id}/heartbeat",
    status_code=204,
    response_class=Response,
    responses={409: {"model": ErrorBody}},
)
def heartbeat(project: ProjectPath, run_id: RunId, ctx: Ctx) -> None:
    """A sign of life from the process logging to the run; a crashed run becomes running."""
    runs.heartbeat(ctx, run_id=run_id, project=project)


@router.patch("/{run_id}", responses={409: {"model": ErrorBody}})
def finish_run(project: ProjectPath, run_id: RunId, body: FinishRunRequest, ctx: Ctx) -> Run:
    return runs.finish_run(ctx, run_id=run_id, project=project, status=body.status)


@router.get("/{run_id}/metrics")
def metric_history(
    project: ProjectPath,
    run_id: RunId,
    key: Annotated[str, Query(min_length=1, max_length=250)],
    ctx: Ctx,
) -> list[MetricPoint]:
    return runs.metric_history(ctx, run_id=run_id, project=project, key=key)


@router.post("/{run_id}/artifacts", status_code=201, responses={409: {"model": ErrorBody}})
def log_artifact(
    project: ProjectPath, run_id: RunId, body: LogArtifactRequest, ctx: Ctx
) -> Artifact:
    if body.after_end:
        _require_job_of(ctx, run_id)
    return runs.log_artifact(
        ctx,
        run_id=run_id,
        project=project,
        path=body.path,
        digest=body.digest,
        size=body.size,
        after_end=body.after_end,
    )


def _require_job_of(ctx: Ctx, run_id: str) -> None:
    """``after_end`` is the executor's, for a job's declared outputs: only that job's own token
    (a Ray worker uploading them) or a server admin may add artifacts to an ended run."""
    principal = ctx.principal
    if principal.server_admin:
        return
    if principal.kind is PrincipalKind.JOB and principal.run_id == run_id:
        return
    raise PermissionDeniedError(
        f"after_end adds a job's declared outputs to its ended run {run_id}: only that job's "
        "token may send it; an ended run takes no other artifacts",
        field="after_end",
    )


@router.post("/{run_id}/inputs", status_code=204, response_class=Response)
def add_input(project: ProjectPath, run_id: RunId, body: AddRunInputRequest, ctx: Ctx) -> None:
    runs.add_input(ctx, run_id=run_id, project=project, dataset=body.dataset, version=body.version)


@router.get("/{run_id}/metric-steps")
def last_steps(project: ProjectPath, run_id: RunId, ctx: Ctx) -> dict[str, int]:
    """The largest stored step of each metric key (where a new attempt continues from)."""
    return runs.last_steps(ctx, run_id=run_id, project=project)


@router.post("/{run_id}/checkpoints", status_code=201, responses={409: {"model": ErrorBody}})
def record_checkpoint(
    project: ProjectPath, run_id: RunId, body: RecordCheckpointRequest, ctx: Ctx
) -> Checkpoint:
    """Record uploaded blobs (``PUT .../blobs/{digest}`` first) as the run's next checkpoint."""
    return checkpoints.record_checkpoint(
        ctx,
        run_id=run_id,
        project=project,
        files=[FileEntry(path=f.path, digest=f.digest, size=f.size) for f in body.files],
        kind=body.kind,
        step=body.step,
        attempt=body.attempt,
    )


@router.get("/{run_id}/checkpoints")
def list_checkpoints(project: ProjectPath, run_id: RunId, ctx: Ctx) -> list[Checkpoint]:
    return checkpoints.list_checkpoints(ctx, run_id=run_id, project=project)


@router.get("/{run_id}/checkpoints/latest")
def latest_checkpoint(project: ProjectPath, run_id: RunId, ctx: Ctx) -> Checkpoint | None:
    """The newest checkpoint, or ``null`` when the run has none."""
    return checkpoints.latest_checkpoint(ctx, run_id=run_id, project=project)
