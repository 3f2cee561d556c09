"""Runs (``/runs``): thin HTTP over ``shipyard.tracking.runs``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from shipyard.domain.models import Artifact, MetricPoint, Run
from shipyard.schemas import (
    AddRunInputRequest,
    CreateRunRequest,
    FinishRunRequest,
    LogArtifactRequest,
    LogBatchRequest,
    LogBatchResponse,
)
from shipyard.server.deps import API_PREFIX, Ctx, OptionalProject
from shipyard.tracking import runs

router = APIRouter(prefix=f"{API_PREFIX}/runs", tags=["runs"])


@router.post("", status_code=201)
def create_run(body: CreateRunRequest, ctx: Ctx) -> Run:
    return runs.create_run(
        ctx,
        project=body.project,
        name=body.name,
        params=body.params,
        tags=body.tags,
        job_id=body.job_id,
    )


@router.get("")
def list_runs(
    ctx: Ctx,
    project: OptionalProject = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[Run]:
    return runs.list_runs(ctx, project=project, limit=limit)


@router.get("/{run_id}")
def get_run(run_id: str, ctx: Ctx) -> Run:
    return runs.get_run(ctx, run_id=run_id)


@router.post("/{run_id}/log-batch")
def log_batch(run_id: str, body: LogBatchRequest, ctx: Ctx) -> LogBatchResponse:
    stored = runs.log_batch(
        ctx, run_id=run_id, metrics=body.metrics, params=body.params, tags=body.tags
    )
    return LogBatchResponse(stored=stored)


@router.patch("/{run_id}")
def finish_run(run_id: str, body: FinishRunRequest, ctx: Ctx) -> Run:
    return runs.finish_run(ctx, run_id=run_id, status=body.status)


@router.get("/{run_id}/metrics")
def metric_history(
    run_id: str, key: Annotated[str, Query(min_length=1, max_length=250)], ctx: Ctx
) -> list[MetricPoint]:
    return runs.metric_history(ctx, run_id=run_id, key=key)


@router.post("/{run_id}/artifacts", status_code=201)
def log_artifact(run_id: str, body: LogArtifactRequest, ctx: Ctx) -> Artifact:
    return runs.log_artifact(ctx, run_id=run_id, path=body.path, digest=body.digest, size=body.size)


@router.post("/{run_id}/inputs", status_code=204, response_class=Response)
def add_input(run_id: str, body: AddRunInputRequest, ctx: Ctx) -> None:
    runs.add_input(
        ctx, run_id=run_id, project=body.project, dataset=body.dataset, version=body.version
    )
