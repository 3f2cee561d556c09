"""Deployments (``/deployments``): thin HTTP over ``shipyard.serving.deployments``."""

from __future__ import annotations

from fastapi import APIRouter

from shipyard.domain.models import Deployment
from shipyard.schemas import CreateDeploymentRequest
from shipyard.server.deps import API_PREFIX, DEFAULT_PROJECT, Ctx, Project
from shipyard.serving import deployments

router = APIRouter(prefix=f"{API_PREFIX}/deployments", tags=["deployments"])


@router.post("", status_code=201)
def deploy(body: CreateDeploymentRequest, ctx: Ctx) -> Deployment:
    return deployments.deploy(
        ctx,
        project=body.project,
        name=body.name,
        model=body.model,
        ref=body.ref,
        max_batch_size=body.max_batch_size,
        max_wait_ms=body.max_wait_ms,
    )


@router.get("")
def list_deployments(ctx: Ctx, project: Project = DEFAULT_PROJECT) -> list[Deployment]:
    return deployments.list_deployments(ctx, project=project)


@router.get("/{name}")
def get_deployment(name: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> Deployment:
    return deployments.get_deployment(ctx, project=project, name=name)


@router.post("/{name}/stop")
def stop_deployment(name: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> Deployment:
    return deployments.stop_deployment(ctx, project=project, name=name)
