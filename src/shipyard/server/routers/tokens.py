"""API tokens (``/tokens``): each caller lists, creates and revokes its own; server admins all.

A new token's secret is in the answer to ``POST`` and nowhere else, ever.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from shipyard.domain.models import Token
from shipyard.domain.names import NAME_MAX_LEN, NAME_PATTERN
from shipyard.domain.principals import Role
from shipyard.schemas import ErrorBody
from shipyard.security import tokens
from shipyard.server.deps import API_PREFIX, Ctx, name_path

router = APIRouter(
    prefix=f"{API_PREFIX}/tokens",
    tags=["tokens"],
    responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)

TokenId = Annotated[str, name_path("The token's id (see GET /api/v1/tokens).")]
Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX_LEN, pattern=NAME_PATTERN)]


class CreateTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    principal: Name | None = Field(
        default=None, description="Whose token (server admins only; default: the caller's)."
    )
    project: Name | None = Field(default=None, description="Narrow the token to this project.")
    role: Role | None = Field(default=None, description="Narrow the token to this role.")
    expires_in: str | None = Field(
        default=None,
        pattern=r"^[1-9][0-9]{0,5}[mhdw]$",
        description="Lifetime, e.g. 90m, 12h, 30d, 8w (default: until revoked).",
    )


class CreatedToken(BaseModel):
    token: Token
    secret: str = Field(description="Shown this once; it is stored only as a hash.")


@router.get("")
def list_tokens(
    ctx: Ctx,
    principal: Annotated[str | None, Query(max_length=NAME_MAX_LEN, pattern=NAME_PATTERN)] = None,
) -> list[Token]:
    return tokens.list_tokens(ctx, principal=principal)


@router.post("", status_code=201)
def create_token(body: CreateTokenRequest, ctx: Ctx) -> CreatedToken:
    expires_at = None
    if body.expires_in is not None:
        expires_at = datetime.now(UTC) + tokens.parse_duration(body.expires_in, field="expires_in")
    token, secret = tokens.create_token(
        ctx,
        name=body.name,
        principal=body.principal,
        project=body.project,
        role=body.role,
        expires_at=expires_at,
    )
    return CreatedToken(token=token, secret=secret)


@router.delete("/{token_id}")
def revoke_token(token_id: TokenId, ctx: Ctx) -> Token:
    return tokens.revoke_token(ctx, token_id=token_id)
