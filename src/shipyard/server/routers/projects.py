"""Projects (``/projects``): server admins create them; each caller lists those it may view."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from shipyard.domain.names import NAME_MAX_LEN, NAME_PATTERN
from shipyard.domain.principals import Project
from shipyard.schemas import ErrorBody
from shipyard.security import principals
from shipyard.server.deps import API_PREFIX, Ctx, ProjectPath

router = APIRouter(
    prefix=f"{API_PREFIX}/projects",
    tags=["projects"],
    responses={
        403: {"model": ErrorBody},
        404: {"model": ErrorBody},
        409: {"model": ErrorBody},
        422: {"model": ErrorBody},
    },
)


class CreateProjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=NAME_MAX_LEN, pattern=NAME_PATTERN)


@router.get("")
def list_projects(ctx: Ctx) -> list[Project]:
    return principals.list_projects(ctx)


@router.post("", status_code=201)
def create_project(body: CreateProjectRequest, ctx: Ctx) -> Project:
    return principals.create_project(ctx, name=body.name)


@router.get("/{project}")
def get_project(project: ProjectPath, ctx: Ctx) -> Project:
    return principals.get_project(ctx, name=project)
