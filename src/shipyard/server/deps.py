"""Dependencies shared by the routers: the per-request service context and common parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from shipyard.context import Context
from shipyard.errors import AuthenticationError
from shipyard.settings import DEFAULT_PROJECT

API_PREFIX = "/api/v1"


def get_ctx(request: Request) -> Context:
    """The service context for this request, acting as the caller that ``AuthMiddleware`` found."""
    ctx: Context = request.app.state.ctx
    actor = getattr(request.state, "actor", None)
    if not actor:  # only when AuthMiddleware did not run: fail closed
        raise AuthenticationError("this request was not authenticated")
    return ctx.as_actor(actor)


Ctx = Annotated[Context, Depends(get_ctx)]
Project = Annotated[str, Query(description="The project (a name).")]
OptionalProject = Annotated[
    str | None, Query(description="The project (a name); all projects when left out.")
]

__all__ = ["API_PREFIX", "DEFAULT_PROJECT", "Ctx", "OptionalProject", "Project", "get_ctx"]
