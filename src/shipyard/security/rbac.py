"""Who may do what: the one check every service makes at its top.

``authorize(ctx, project=..., need=Role.EDITOR)`` passes or raises. A server admin passes
everywhere. Anyone else has, in ``project``, the lower of their membership role and the token's
role, and nothing at all outside the token's project. With no role in a project the caller gets
the very ``NotFoundError`` a missing project gets, so nobody learns which project names exist;
with a role too weak for the action, a ``PermissionDeniedError`` (403) naming the role needed.

Job principals (the token a server hands a job it launches) view their own project and may write
exactly two things: their own run, and new model versions in their project.
"""

from __future__ import annotations

from shipyard.context import Context
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Principal, PrincipalKind, Role
from shipyard.errors import NotFoundError, PermissionDeniedError


def authorize(
    ctx: Context,
    *,
    project: str,
    need: Role,
    run_id: str | None = None,
    registers_model: bool = False,
    uploads_blob: bool = False,
) -> None:
    """Raise unless the caller may act with role ``need`` in ``project``.

    ``run_id``: the run a write goes to (a job principal may write to its own run);
    ``registers_model``: the write creates a model version (a job principal may, in its project);
    ``uploads_blob``: the write stores a blob (a job may, for its artifacts and models).
    """
    validate_name(project, field="project")
    principal = ctx.principal
    if principal.server_admin:
        return
    role = role_in(principal, project)
    if role is None:
        raise project_not_found(project)
    need = Role(need)
    if principal.kind is PrincipalKind.JOB and need is not Role.VIEWER:
        if run_id is not None and run_id == principal.run_id:
            return
        if registers_model or uploads_blob:
            return
        raise PermissionDeniedError(
            f"a job's token may only view project {project!r}, log to the job's own run "
            f"and register models there; this needs the {need.value} role",
            field="project",
            project=project,
            need=need.value,
        )
    if not role.allows(need):
        raise PermissionDeniedError(
            f"this needs the {need.value} role in project {project!r}, and {principal.actor} "
            f"has {role.value}; a project admin can change it with "
            f"'shipyard members add {project} {principal.name} --role {need.value}'",
            field="project",
            project=project,
            need=need.value,
            role=role.value,
        )


def authorize_resource(
    ctx: Context,
    *,
    project: str,
    given: str | None,
    need: Role,
    missing: NotFoundError,
    run_id: str | None = None,
    registers_model: bool = False,
) -> None:
    """``authorize`` for a resource found by id, which lives in ``project``.

    ``given``: the project the caller named (the path's); the resource must be in it, else
    ``missing`` (the error a missing id gets). A caller who may not view the resource's project
    gets ``missing`` too, or - when they named a project - that project's not-found error, so
    neither ids nor project names leak across projects.
    """
    if given is not None:
        validate_name(given, field="project")
        if role_in(ctx.principal, given) is None:
            raise project_not_found(given)
        if given != project:
            raise missing
    elif role_in(ctx.principal, project) is None:
        raise missing
    authorize(ctx, project=project, need=need, run_id=run_id, registers_model=registers_model)


def require_server_admin(ctx: Context, *, what: str) -> None:
    """Raise ``PermissionDeniedError`` unless the caller is a server admin."""
    if not ctx.principal.server_admin:
        raise PermissionDeniedError(
            f"{what} is for server admins only, and {ctx.principal.actor} is not one",
            field="principal",
        )


def role_in(principal: Principal, project: str) -> Role | None:
    """The caller's effective role in ``project`` (``ADMIN`` for server admins), or ``None``."""
    if principal.server_admin:
        return Role.ADMIN
    if principal.token_project is not None and principal.token_project != project:
        return None
    member = principal.roles.get(project)
    if member is None:
        return None
    return Role.lowest(Role(member), principal.token_role)


def can_view(principal: Principal, project: str) -> bool:
    return role_in(principal, project) is not None


def viewable(principal: Principal, projects: list[str]) -> list[str]:
    """The projects of ``projects`` the caller may view, in their order (list endpoints)."""
    return [p for p in projects if can_view(principal, p)]


def project_not_found(project: str) -> NotFoundError:
    """The error a missing project gets; also what a caller with no role there sees."""
    return NotFoundError(f"project {project!r} does not exist", field="project")


__all__ = [
    "authorize",
    "authorize_resource",
    "can_view",
    "project_not_found",
    "require_server_admin",
    "role_in",
    "viewable",
]
