"""Models (``/projects/{project}/models``): thin HTTP over ``shipyard.tracking.registry``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from shipyard.domain.models import AliasEvent, ModelVersion, RegisteredModel
from shipyard.schemas import ErrorBody, RegisterModelVersionRequest, SetAliasRequest
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath, name_path
from shipyard.tracking import registry

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/models",
    tags=["models"],
)

ModelName = Annotated[str, name_path("The registered model (a name).")]
VersionRef = Annotated[str, name_path("A version number, 'vN', 'latest' or an alias.")]
AliasName = Annotated[str, name_path("The alias (a word such as 'production').")]


@router.get("")
def list_models(project: ProjectPath, ctx: Ctx) -> list[RegisteredModel]:
    return registry.list_models(ctx, project=project)


@router.get("/{name}")
def get_model(project: ProjectPath, name: ModelName, ctx: Ctx) -> RegisteredModel:
    return registry.get_model(ctx, project=project, model=name)


@router.post("/{name}/versions", status_code=201, responses={409: {"model": ErrorBody}})
def register_version(
    project: ProjectPath, name: ModelName, body: RegisterModelVersionRequest, ctx: Ctx
) -> ModelVersion:
    return registry.register_version(
        ctx,
        project=project,
        model=name,
        run_id=body.run_id,
        artifact_path=body.artifact_path,
        digest=body.digest,
        format=body.format,
        description=body.description,
        example=body.example,
        parity=body.parity,
    )


@router.get("/{name}/versions")
def list_versions(project: ProjectPath, name: ModelName, ctx: Ctx) -> list[ModelVersion]:
    return registry.list_versions(ctx, project=project, model=name)


@router.get("/{name}/versions/{ref}")
def get_version(project: ProjectPath, name: ModelName, ref: VersionRef, ctx: Ctx) -> ModelVersion:
    return registry.get_version(ctx, project=project, model=name, ref=ref)


@router.put("/{name}/aliases/{alias}")
def set_alias(
    project: ProjectPath, name: ModelName, alias: AliasName, body: SetAliasRequest, ctx: Ctx
) -> ModelVersion:
    return registry.set_alias(ctx, project=project, model=name, alias=alias, version=body.version)


@router.delete("/{name}/aliases/{alias}", status_code=204, response_class=Response)
def delete_alias(project: ProjectPath, name: ModelName, alias: AliasName, ctx: Ctx) -> None:
    registry.delete_alias(ctx, project=project, model=name, alias=alias)


@router.get("/{name}/alias-history")
def alias_history(project: ProjectPath, name: ModelName, ctx: Ctx) -> list[AliasEvent]:
    return registry.alias_history(ctx, project=project, model=name)
