"""Models (``/models``): thin HTTP over ``shipyard.tracking.registry``."""

from __future__ import annotations

from fastapi import APIRouter, Response

from shipyard.domain.models import AliasEvent, ModelVersion, RegisteredModel
from shipyard.schemas import RegisterModelVersionRequest, SetAliasRequest
from shipyard.server.deps import API_PREFIX, DEFAULT_PROJECT, Ctx, Project
from shipyard.tracking import registry

router = APIRouter(prefix=f"{API_PREFIX}/models", tags=["models"])


@router.get("")
def list_models(ctx: Ctx, project: Project = DEFAULT_PROJECT) -> list[RegisteredModel]:
    return registry.list_models(ctx, project=project)


@router.get("/{name}")
def get_model(name: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> RegisteredModel:
    return registry.get_model(ctx, project=project, model=name)


@router.post("/{name}/versions", status_code=201)
def register_version(name: str, body: RegisterModelVersionRequest, ctx: Ctx) -> ModelVersion:
    return registry.register_version(
        ctx,
        project=body.project,
        model=name,
        run_id=body.run_id,
        artifact_path=body.artifact_path,
        digest=body.digest,
        format=body.format,
        description=body.description,
    )


@router.get("/{name}/versions")
def list_versions(name: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> list[ModelVersion]:
    return registry.list_versions(ctx, project=project, model=name)


@router.get("/{name}/versions/{ref}")
def get_version(name: str, ref: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> ModelVersion:
    return registry.get_version(ctx, project=project, model=name, ref=ref)


@router.put("/{name}/aliases/{alias}")
def set_alias(name: str, alias: str, body: SetAliasRequest, ctx: Ctx) -> ModelVersion:
    return registry.set_alias(
        ctx, project=body.project, model=name, alias=alias, version=body.version
    )


@router.delete("/{name}/aliases/{alias}", status_code=204, response_class=Response)
def delete_alias(name: str, alias: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> None:
    registry.delete_alias(ctx, project=project, model=name, alias=alias)


@router.get("/{name}/alias-history")
def alias_history(name: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> list[AliasEvent]:
    return registry.alias_history(ctx, project=project, model=name)
