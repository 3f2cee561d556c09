"""Project members (``/projects/{project}/members``): viewers see them, project admins set them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict

from shipyard.domain.principals import Member, Role
from shipyard.schemas import ErrorBody
from shipyard.security import principals
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath, name_path

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/members",
    tags=["members"],
    responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)

PrincipalName = Annotated[str, name_path("The member's name (a user or service account).")]


class SetMemberRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role


@router.get("")
def list_members(project: ProjectPath, ctx: Ctx) -> list[Member]:
    return principals.list_members(ctx, project=project)


@router.put("/{principal}")
def set_member(
    project: ProjectPath, principal: PrincipalName, body: SetMemberRequest, ctx: Ctx
) -> Member:
    return principals.set_member(ctx, project=project, principal=principal, role=body.role)


@router.delete("/{principal}", status_code=204)
def remove_member(project: ProjectPath, principal: PrincipalName, ctx: Ctx) -> Response:
    principals.remove_member(ctx, project=project, principal=principal)
    return Response(status_code=204)
