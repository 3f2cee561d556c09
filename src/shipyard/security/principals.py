"""Users, service accounts, projects and their members, and the tokens of jobs.

Server admins create users, service accounts and projects; a project's admins manage its members.
Every change is audited. Job principals are made by the server when it launches a job
(``issue_job_token``) and end with it (``revoke_job_tokens``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from shipyard.context import Context, new_id
from shipyard.domain.names import validate_name
from shipyard.domain.principals import (
    Member,
    Principal,
    PrincipalInfo,
    PrincipalKind,
    Project,
    Role,
)
from shipyard.errors import ConflictError, InvalidInputError, NotFoundError
from shipyard.security import audit
from shipyard.security.rbac import authorize, project_not_found, require_server_admin, viewable
from shipyard.security.tokens import TOKEN_PREFIX, forget_verified, hash_token, load_principal
from shipyard.store.queries import project_id
from shipyard.store.tables import (
    PrincipalRow,
    ProjectMemberRow,
    ProjectRow,
    TokenRow,
    aware,
    utcnow,
)

JOB_PREFIX = "job-"


# --- users and service accounts -------------------------------------------------------------------


def create_principal(
    ctx: Context,
    *,
    name: str,
    kind: PrincipalKind | str = PrincipalKind.USER,
    server_admin: bool = False,
) -> PrincipalInfo:
    """Create a user or a service account (server admins only)."""
    require_server_admin(ctx, what="creating users and service accounts")
    validate_name(name, field="name")
    kind = _parse_kind(kind)
    if name.startswith(JOB_PREFIX):
        raise InvalidInputError(
            f"name {name!r} starts with {JOB_PREFIX!r}, which is kept for job principals",
            field="name",
        )
    with ctx.db.transaction() as s:
        if s.scalar(select(PrincipalRow.id).where(PrincipalRow.name == name)) is not None:
            raise ConflictError(f"a user or service account named {name!r} exists", field="name")
        row = PrincipalRow(id=new_id(), name=name, kind=kind.value, server_admin=server_admin)
        s.add(row)
        audit.record(
            s,
            actor=ctx.actor,
            action=f"{kind.value}.create",
            resource=f"principal/{name}",
            details={"server_admin": server_admin},
        )
        s.flush()
        return _info(row)


def list_principals(ctx: Context) -> list[PrincipalInfo]:
    """Users and service accounts (server admins only); job principals are left out."""
    require_server_admin(ctx, what="listing users")
    with ctx.db.read() as s:
        rows = s.scalars(
            select(PrincipalRow)
            .where(PrincipalRow.kind != PrincipalKind.JOB.value)
            .order_by(PrincipalRow.name)
        )
        return [_info(r) for r in rows]


def disable_principal(ctx: Context, *, name: str) -> PrincipalInfo:
    """Disable a user or service account: its tokens stop working at once (server admins)."""
    require_server_admin(ctx, what="disabling users")
    with ctx.db.transaction() as s:
        row = _require_principal(s, name)
        if row.disabled_at is None:
            row.disabled_at = utcnow()
            audit.record(
                s,
                actor=ctx.actor,
                action="principal.disable",
                resource=f"principal/{name}",
                details={},
            )
        s.flush()
        info = _info(row)
    forget_verified()
    return info


def whoami(ctx: Context) -> Principal:
    return ctx.principal


# --- projects -----------------------------------------------------------------------------------


def create_project(ctx: Context, *, name: str) -> Project:
    """Create a project (server admins only); its members are added with ``set_member``."""
    require_server_admin(ctx, what="creating projects")
    validate_name(name, field="name")
    with ctx.db.transaction() as s:
        if s.scalar(select(ProjectRow.id).where(ProjectRow.name == name)) is not None:
            raise ConflictError(f"project {name!r} exists", field="name")
        project_id(s, name, create=True)
        audit.record(
            s, actor=ctx.actor, action="project.create", resource=f"project/{name}", details={}
        )
        row = s.scalars(select(ProjectRow).where(ProjectRow.name == name)).one()
        project = _project(row)
    forget_verified()  # a narrowed server admin's token reaches new projects too
    return project


def list_projects(ctx: Context) -> list[Project]:
    """The projects the caller may view, by name."""
    with ctx.db.read() as s:
        rows = list(s.scalars(select(ProjectRow).order_by(ProjectRow.name)))
    names = set(viewable(ctx.principal, [r.name for r in rows]))
    return [_project(r) for r in rows if r.name in names]


def get_project(ctx: Context, *, name: str) -> Project:
    validate_name(name, field="project")
    authorize(ctx, project=name, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = s.scalar(select(ProjectRow).where(ProjectRow.name == name))
        if row is None:
            raise project_not_found(name)
        return _project(row)


# --- members ------------------------------------------------------------------------------------


def list_members(ctx: Context, *, project: str) -> list[Member]:
    validate_name(project, field="project")
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        pid = project_id(s, project, create=False)
        rows = s.execute(
            select(ProjectMemberRow, PrincipalRow)
            .join(PrincipalRow, PrincipalRow.id == ProjectMemberRow.principal_id)
            .where(ProjectMemberRow.project_id == pid)
            .order_by(PrincipalRow.name)
        ).all()
        return [_member(project, m, p) for m, p in rows]


def set_member(ctx: Context, *, project: str, principal: str, role: Role | str) -> Member:
    """Give ``principal`` ``role`` in ``project`` (project admins and server admins)."""
    validate_name(project, field="project")
    authorize(ctx, project=project, need=Role.ADMIN)
    role = Role.parse(role)
    with ctx.db.transaction() as s:
        pid = project_id(s, project, create=False)
        prow = _require_principal(s, principal)
        if prow.kind == PrincipalKind.JOB.value:
            raise InvalidInputError(
                f"{principal!r} is the principal of a job: it gets its access from its job "
                "(its own run and project) and cannot be made a member",
                field="principal",
            )
        member = s.get(ProjectMemberRow, (pid, prow.id))
        previous = member.role if member is not None else None
        if member is None:
            member = ProjectMemberRow(project_id=pid, principal_id=prow.id, role=role.value)
            s.add(member)
        else:
            member.role = role.value
        audit.record(
            s,
            actor=ctx.actor,
            action="member.set",
            resource=f"project/{project}/member/{principal}",
            details={"role": role.value, "previous": previous},
        )
        s.flush()
        changed = _member(project, member, prow)
    forget_verified()
    return changed


def remove_member(ctx: Context, *, project: str, principal: str) -> None:
    validate_name(project, field="project")
    authorize(ctx, project=project, need=Role.ADMIN)
    with ctx.db.transaction() as s:
        pid = project_id(s, project, create=False)
        prow = _require_principal(s, principal)
        member = s.get(ProjectMemberRow, (pid, prow.id))
        if member is None:
            raise NotFoundError(
                f"{principal!r} is not a member of project {project!r}", field="principal"
            )
        audit.record(
            s,
            actor=ctx.actor,
            action="member.remove",
            resource=f"project/{project}/member/{principal}",
            details={"previous": member.role},
        )
        s.delete(member)
    forget_verified()


# --- job principals -----------------------------------------------------------------------------


def issue_job_token(ctx: Context, *, job_id: str, project: str, run_id: str | None) -> str:
    """A secret for job ``job_id``: it views ``project``, writes to run ``run_id`` and registers
    models there, nothing else; ``revoke_job_tokens`` ends it when the job ends."""
    with ctx.db.transaction() as s:
        return issue_job_tokens_in(s, ctx, [(job_id, project, run_id)])[job_id]


def issue_job_tokens_in(
    s: Session, ctx: Context, jobs: Sequence[tuple[str, str, str | None]]
) -> dict[str, str]:
    """``issue_job_token`` for each ``(job_id, project, run_id)`` inside the caller's write
    transaction, in a few statements (the admission pipeline issues the tokens of every job one
    step launches together): job id -> secret, one ``token.issue_job`` event per job."""
    for project in dict.fromkeys(project for _job, project, _run in jobs):
        authorize(ctx, project=project, need=Role.EDITOR)
    pids = {
        project: project_id(s, project, create=False)
        for project in dict.fromkeys(project for _job, project, _run in jobs)
    }
    names = [f"{JOB_PREFIX}{job_id}" for job_id, _project, _run in jobs]
    existing = {
        row.name: row
        for chunk in _chunks(names)
        for row in s.scalars(select(PrincipalRow).where(PrincipalRow.name.in_(chunk)))
    }
    created: list[tuple[PrincipalRow, str]] = []
    owners: dict[str, PrincipalRow] = {}
    for (job_id, project, run_id), name in zip(jobs, names, strict=True):
        prow = existing.get(name)
        if prow is None:
            prow = existing[name] = PrincipalRow(
                id=new_id(), name=name, kind=PrincipalKind.JOB.value, job_id=job_id, run_id=run_id
            )
            s.add(prow)
            created.append((prow, pids[project]))
        else:
            prow.run_id = run_id
            prow.disabled_at = None
        owners[job_id] = prow
    if created:
        s.flush()  # the principals before their memberships
        for prow, pid in created:
            s.add(ProjectMemberRow(project_id=pid, principal_id=prow.id, role=Role.VIEWER.value))
    secrets_of: dict[str, str] = {}
    for job_id, project, run_id in jobs:
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        name = f"{JOB_PREFIX}{job_id}"
        token = TokenRow(
            id=new_id(),
            name=name,
            prefix=secret[:10],
            token_hash=hash_token(secret),
            principal_id=owners[job_id].id,
            project=project,
        )
        s.add(token)
        audit.record(
            s,
            actor=ctx.actor,
            action="token.issue_job",
            resource=f"token/{token.id}",
            details={"job_id": job_id, "project": project, "run_id": run_id},
        )
        secrets_of[job_id] = secret
    return secrets_of


def revoke_job_tokens(ctx: Context, *, job_id: str) -> None:
    """Revoke every token of job ``job_id`` (idempotent; nothing to do for a job without one)."""
    with ctx.db.transaction() as s:
        revoke_job_tokens_in(s, actor=ctx.actor, job_ids=[job_id])


def revoke_job_tokens_in(s: Session, *, actor: str, job_ids: Sequence[str]) -> None:
    """``revoke_job_tokens`` for several jobs inside the caller's write transaction (the
    admission pipeline ends every job one look found finished in one transaction): one
    ``token.revoke_job`` event per job that had live tokens, as one call per job writes."""
    # verified tokens are forgotten once the revocation is committed (not before: a check
    # between the two would remember a token about to be revoked)
    event.listen(s, "after_commit", _forget_verified_on_commit, once=True)
    now = utcnow()
    for chunk in _chunks(list(job_ids)):
        owners: dict[str, str] = {
            principal_id: job_id or ""
            for principal_id, job_id in s.execute(
                select(PrincipalRow.id, PrincipalRow.job_id).where(
                    PrincipalRow.job_id.in_(chunk), PrincipalRow.kind == PrincipalKind.JOB.value
                )
            ).all()
        }
        if not owners:
            continue
        live: dict[str, int] = {}
        for principal_id in s.scalars(
            select(TokenRow.principal_id).where(
                TokenRow.principal_id.in_(list(owners)), TokenRow.revoked_at.is_(None)
            )
        ):
            job = owners[str(principal_id)]
            live[job] = live.get(job, 0) + 1
        if live:
            s.execute(
                update(TokenRow)
                .where(TokenRow.principal_id.in_(list(owners)), TokenRow.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        s.execute(
            update(PrincipalRow).where(PrincipalRow.id.in_(list(owners))).values(disabled_at=now)
        )
        for job in chunk:  # in the caller's order, one event per job, as before
            if live.get(job):
                audit.record(
                    s,
                    actor=actor,
                    action="token.revoke_job",
                    resource=f"job/{job}",
                    details={"tokens": live[job]},
                )


def _forget_verified_on_commit(session: Session) -> None:
    forget_verified()


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    """Bounded IN lists (SQLite caps the parameters of one statement)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def principal_by_name(ctx: Context, *, name: str) -> Principal:
    """The principal ``name`` with its roles (server admins; for tools and tests)."""
    require_server_admin(ctx, what="acting as someone else")
    with ctx.db.read() as s:
        return load_principal(s, _require_principal(s, name))


# --- helpers ------------------------------------------------------------------------------------


def _require_principal(s: Session, name: str) -> PrincipalRow:
    validate_name(name, field="principal")
    row = s.scalar(select(PrincipalRow).where(PrincipalRow.name == name))
    if row is None:
        raise NotFoundError(
            f"no user or service account is named {name!r}; see 'shipyard users list'",
            field="principal",
        )
    return row


def _parse_kind(kind: PrincipalKind | str) -> PrincipalKind:
    try:
        parsed = PrincipalKind(kind)
    except ValueError:
        parsed = None
    if parsed is None or parsed is PrincipalKind.JOB:
        raise InvalidInputError(f"kind {kind!r} is not one of user, service", field="kind")
    return parsed


def _info(row: PrincipalRow) -> PrincipalInfo:
    return PrincipalInfo(
        id=row.id,
        name=row.name,
        kind=PrincipalKind(row.kind),
        server_admin=row.server_admin,
        created_at=aware(row.created_at) or utcnow(),
        disabled=row.disabled_at is not None,
    )


def _project(row: ProjectRow) -> Project:
    return Project(name=row.name, created_at=aware(row.created_at) or utcnow())


def _member(project: str, member: ProjectMemberRow, prow: PrincipalRow) -> Member:
    return Member(
        project=project, principal=prow.name, kind=PrincipalKind(prow.kind), role=Role(member.role)
    )


__all__ = [
    "create_principal",
    "create_project",
    "disable_principal",
    "get_project",
    "issue_job_token",
    "list_members",
    "list_principals",
    "list_projects",
    "principal_by_name",
    "remove_member",
    "revoke_job_tokens",
    "set_member",
    "whoami",
]
