"""Users and service accounts (``/users``): server admins manage them; anyone sees themselves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from shipyard.domain.names import NAME_MAX_LEN, NAME_PATTERN
from shipyard.domain.principals import Principal, PrincipalInfo, PrincipalKind
from shipyard.schemas import ErrorBody
from shipyard.security import principals
from shipyard.server.deps import API_PREFIX, Ctx, name_path

router = APIRouter(
    prefix=f"{API_PREFIX}/users",
    tags=["users"],
    responses={
        403: {"model": ErrorBody},
        404: {"model": ErrorBody},
        409: {"model": ErrorBody},
        422: {"model": ErrorBody},
    },
)

PrincipalName = Annotated[str, name_path("The user's or service account's name.")]


class CreateUserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=NAME_MAX_LEN, pattern=NAME_PATTERN)
    kind: PrincipalKind = PrincipalKind.USER
    server_admin: bool = False


@router.get("")
def list_users(ctx: Ctx) -> list[PrincipalInfo]:
    return principals.list_principals(ctx)


@router.post("", status_code=201)
def create_user(body: CreateUserRequest, ctx: Ctx) -> PrincipalInfo:
    return principals.create_principal(
        ctx, name=body.name, kind=body.kind, server_admin=body.server_admin
    )


@router.get("/me")
def whoami(ctx: Ctx) -> Principal:
    return principals.whoami(ctx)


@router.post("/{name}/disable")
def disable_user(name: PrincipalName, ctx: Ctx) -> PrincipalInfo:
    return principals.disable_principal(ctx, name=name)
