"""Inference (``/v2/models/{deployment}/...``): the gateway's OIP routes, thin over
``shipyard.serving.gateway``.

The server's root is the default project's OIP base URL and ``/projects/{project}`` any
project's, so an OIP client (tritonclient, KServe's) pointed at either works unchanged.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, Response

from shipyard.server.deps import Ctx, ProjectPath, name_path
from shipyard.serving.gateway import Gateway
from shipyard.settings import DEFAULT_PROJECT

router = APIRouter(tags=["inference"])

DeploymentName = Annotated[str, name_path("The deployment (a name).")]
Version = Annotated[str, name_path("A model version the deployment serves.")]


@router.post("/v2/models/{name}/infer", response_class=Response)
async def infer(name: DeploymentName, request: Request, ctx: Ctx) -> Response:
    return await _forward(request, ctx, DEFAULT_PROJECT, name, f"/v2/models/{name}/infer")


@router.post("/projects/{project}/v2/models/{name}/infer", response_class=Response)
async def infer_in_project(
    project: ProjectPath, name: DeploymentName, request: Request, ctx: Ctx
) -> Response:
    return await _forward(request, ctx, project, name, f"/v2/models/{name}/infer")


@router.get("/v2/models/{name}", response_class=Response)
async def model_metadata(name: DeploymentName, request: Request, ctx: Ctx) -> Response:
    return await _forward(request, ctx, DEFAULT_PROJECT, name, f"/v2/models/{name}", "GET")


@router.get("/projects/{project}/v2/models/{name}", response_class=Response)
async def model_metadata_in_project(
    project: ProjectPath, name: DeploymentName, request: Request, ctx: Ctx
) -> Response:
    return await _forward(request, ctx, project, name, f"/v2/models/{name}", "GET")


@router.get("/v2/models/{name}/ready", response_class=Response)
async def model_ready(name: DeploymentName, request: Request, ctx: Ctx) -> Response:
    return await _forward(request, ctx, DEFAULT_PROJECT, name, f"/v2/models/{name}/ready", "GET")


@router.get("/projects/{project}/v2/models/{name}/ready", response_class=Response)
async def model_ready_in_project(
    project: ProjectPath, name: DeploymentName, request: Request, ctx: Ctx
) -> Response:
    return await _forward(request, ctx, project, name, f"/v2/models/{name}/ready", "GET")


async def _forward(
    request: Request, ctx: Ctx, project: str, name: str, path: str, method: str = "POST"
) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await request.body() if method == "POST" else b""
    answer = await gateway.forward(
        ctx,
        project=project,
        name=name,
        path=path,
        body=body,
        headers=request.headers.raw,
        method=method,
    )
    return Response(content=answer.content, status_code=answer.status, headers=answer.headers)
