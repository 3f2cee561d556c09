"""Deployments (``/projects/{project}/deployments``): thin HTTP over
``shipyard.serving.deployments``. Every write records the desired state and returns at once;
the server's reconciler makes it so (watch ``status``, ``replicas`` and ``rollout``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from shipyard.domain.models import Deployment
from shipyard.schemas import (
    CreateDeploymentRequest,
    ErrorBody,
    ScaleDeploymentRequest,
    UpdateDeploymentRequest,
)
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath, name_path
from shipyard.serving import deployments

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/deployments",
    tags=["deployments"],
)

DeploymentName = Annotated[str, name_path("The deployment (a name).")]


@router.post("", status_code=201, responses={409: {"model": ErrorBody}})
def deploy(project: ProjectPath, body: CreateDeploymentRequest, ctx: Ctx) -> Deployment:
    return deployments.deploy(
        ctx,
        project=project,
        name=body.name,
        model=body.model,
        ref=body.ref,
        spec=body.spec,
        max_batch_size=body.max_batch_size,
        max_wait_ms=body.max_wait_ms,
    )


@router.get("")
def list_deployments(project: ProjectPath, ctx: Ctx) -> list[Deployment]:
    return deployments.list_deployments(ctx, project=project)


@router.get("/{name}")
def get_deployment(project: ProjectPath, name: DeploymentName, ctx: Ctx) -> Deployment:
    return deployments.get_deployment(ctx, project=project, name=name)


@router.patch("/{name}", responses={409: {"model": ErrorBody}})
def update_deployment(
    project: ProjectPath, name: DeploymentName, body: UpdateDeploymentRequest, ctx: Ctx
) -> Deployment:
    return deployments.update_deployment(
        ctx,
        project=project,
        name=name,
        targets=body.targets,
        replicas=body.replicas,
        resources=body.resources,
        batching=body.batching,
        autoscaling=(
            body.autoscaling if "autoscaling" in body.model_fields_set else deployments.UNCHANGED
        ),
    )


@router.post("/{name}/scale", responses={409: {"model": ErrorBody}})
def scale_deployment(
    project: ProjectPath, name: DeploymentName, body: ScaleDeploymentRequest, ctx: Ctx
) -> Deployment:
    return deployments.scale_deployment(
        ctx, project=project, name=name, min_replicas=body.min, max_replicas=body.max
    )


@router.post("/{name}/stop", responses={409: {"model": ErrorBody}})
def stop_deployment(project: ProjectPath, name: DeploymentName, ctx: Ctx) -> Deployment:
    return deployments.stop_deployment(ctx, project=project, name=name)
