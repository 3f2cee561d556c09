"""Dependencies shared by the routers: the per-request service context and common parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request

from shipyard.context import Context
from shipyard.domain.principals import Principal
from shipyard.errors import AuthenticationError
from shipyard.schemas import NAME_RULE
from shipyard.settings import DEFAULT_PROJECT

API_PREFIX = "/api/v1"
# Every resource route lives under its project: a by-id route of another project is a 404.
PROJECT_PREFIX = f"{API_PREFIX}/projects/{{project}}"


def get_ctx(request: Request) -> Context:
    """The service context for this request, acting as the principal ``AuthMiddleware`` found
    (with auth off, the local user: server admin, as ``local``)."""
    ctx: Context = request.app.state.ctx
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # only when AuthMiddleware did not run: fail closed
        raise AuthenticationError("this request was not authenticated")
    return ctx.as_principal(principal)


Ctx = Annotated[Context, Depends(get_ctx)]
Project = Annotated[str, Query(description="The project (a name).")]
OptionalProject = Annotated[
    str | None, Query(description="The project (a name); all projects when left out.")
]


def name_path(description: str) -> Any:
    """A path segment that is a name (or an id). The name rule is published in the OpenAPI; the
    services enforce it (``validate_name``), with their own error naming the field."""
    return Path(description=description, json_schema_extra=NAME_RULE)


ProjectPath = Annotated[str, name_path("The project (a name) the resource belongs to.")]

__all__ = [
    "API_PREFIX",
    "DEFAULT_PROJECT",
    "PROJECT_PREFIX",
    "Ctx",
    "OptionalProject",
    "Project",
    "ProjectPath",
    "get_ctx",
    "name_path",
]
