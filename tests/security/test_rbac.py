"""security.rbac and the token lifecycle: roles per project, narrowing, expiry, revocation, jobs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from shipyard.context import Context
from shipyard.domain.principals import Principal, PrincipalKind, Role
from shipyard.errors import (
    AuthenticationError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from shipyard.security import principals, tokens
from shipyard.security.rbac import authorize
from shipyard.store.tables import TokenRow, utcnow
from shipyard.tracking import runs


def _user(name: str, **roles: Role) -> Principal:
    return Principal(id=name, name=name, kind=PrincipalKind.USER, roles=roles)


def test_roles_are_ordered() -> None:
    assert Role.ADMIN.allows(Role.EDITOR) and Role.EDITOR.allows(Role.VIEWER)
    assert not Role.VIEWER.allows(Role.EDITOR)
    assert Role.lowest(Role.ADMIN, Role.VIEWER) is Role.VIEWER
    assert Role.lowest(None, Role.EDITOR) is Role.EDITOR


def test_authorize_member_roles_and_hidden_projects(ctx: Context) -> None:
    alice = ctx.as_principal(_user("alice", alpha=Role.VIEWER))
    authorize(alice, project="alpha", need=Role.VIEWER)
    with pytest.raises(PermissionDeniedError) as denied:
        authorize(alice, project="alpha", need=Role.EDITOR)
    assert "editor" in denied.value.message and "alpha" in denied.value.message
    assert denied.value.http_status == 403
    with pytest.raises(NotFoundError) as hidden:
        authorize(alice, project="beta", need=Role.VIEWER)
    assert hidden.value.message == "project 'beta' does not exist"
    with pytest.raises(InvalidInputError):
        authorize(alice, project="../x", need=Role.VIEWER)


def test_a_token_narrows_but_never_widens(ctx: Context) -> None:
    narrowed = _user("bob", alpha=Role.ADMIN, beta=Role.ADMIN).model_copy(
        update={"token_project": "alpha", "token_role": Role.VIEWER}
    )
    c = ctx.as_principal(narrowed)
    authorize(c, project="alpha", need=Role.VIEWER)
    with pytest.raises(PermissionDeniedError):
        authorize(c, project="alpha", need=Role.EDITOR)
    with pytest.raises(NotFoundError):
        authorize(c, project="beta", need=Role.VIEWER)


def test_a_job_principal_writes_its_run_and_models_only(ctx: Context) -> None:
    job = Principal(
        id="j",
        name="job-1",
        kind=PrincipalKind.JOB,
        roles={"alpha": Role.VIEWER},
        token_project="alpha",
        job_id="1",
        run_id="r1",
    )
    c = ctx.as_principal(job)
    assert c.actor == "job:1"
    authorize(c, project="alpha", need=Role.VIEWER)
    authorize(c, project="alpha", need=Role.EDITOR, run_id="r1")
    authorize(c, project="alpha", need=Role.EDITOR, registers_model=True)
    with pytest.raises(PermissionDeniedError):
        authorize(c, project="alpha", need=Role.EDITOR, run_id="r2")
    with pytest.raises(PermissionDeniedError):
        authorize(c, project="alpha", need=Role.EDITOR)


def test_services_authorise_the_embedded_caller_too(ctx: Context) -> None:
    principals.create_project(ctx, name="alpha")
    principals.create_principal(ctx, name="carol")
    principals.set_member(ctx, project="alpha", principal="carol", role="viewer")
    run = runs.create_run(ctx, project="alpha")
    carol = ctx.as_principal(principals.principal_by_name(ctx, name="carol"))
    assert runs.get_run(carol, run_id=run.id).id == run.id
    with pytest.raises(PermissionDeniedError):
        runs.finish_run(carol, run_id=run.id)
    with pytest.raises(NotFoundError):  # the run exists, but not in that project
        runs.get_run(ctx, run_id=run.id, project="default")
    assert runs.get_run(ctx, run_id=run.id).status.value == "running"  # nothing changed
    assert [r.id for r in runs.list_runs(carol)] == [run.id]
    principals.create_principal(ctx, name="dave")
    dave = ctx.as_principal(principals.principal_by_name(ctx, name="dave"))
    assert runs.list_runs(dave) == []
    with pytest.raises(NotFoundError) as hidden:
        runs.get_run(dave, run_id=run.id)
    assert "alpha" not in hidden.value.message


def test_only_server_admins_manage_users_and_projects(ctx: Context) -> None:
    principals.create_principal(ctx, name="erin")
    erin = ctx.as_principal(principals.principal_by_name(ctx, name="erin"))
    for call in (
        lambda: principals.create_project(erin, name="mine"),
        lambda: principals.create_principal(erin, name="frank"),
        lambda: principals.list_principals(erin),
    ):
        with pytest.raises(PermissionDeniedError):
            call()
    with pytest.raises(InvalidInputError) as bad:
        principals.set_member(ctx, project="default", principal="erin", role="owner")
    assert bad.value.field == "role"


def test_expired_and_revoked_tokens_are_refused_with_where_to_go(ctx: Context) -> None:
    principals.create_principal(ctx, name="gail")
    token, secret = tokens.create_token(
        ctx, name="short", principal="gail", expires_at=utcnow() + timedelta(hours=1)
    )
    assert tokens.authenticate(ctx, secret=secret).name == "gail"
    with ctx.db.transaction() as s:
        s.get(TokenRow, token.id).expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    with pytest.raises(AuthenticationError) as expired:
        tokens.authenticate(ctx, secret=secret)
    assert "expired" in expired.value.message
    assert (
        "shipyard token list" in expired.value.message and "/api/v1/tokens" in expired.value.message
    )

    other, other_secret = tokens.create_token(ctx, name="long", principal="gail")
    gail = ctx.as_principal(tokens.authenticate(ctx, secret=other_secret))
    assert [t.name for t in tokens.list_tokens(gail)] == ["short", "long"]
    tokens.revoke_token(gail, token_id=other.id)
    with pytest.raises(AuthenticationError) as revoked:
        tokens.authenticate(ctx, secret=other_secret)
    assert "revoked" in revoked.value.message
    with pytest.raises(InvalidInputError):
        tokens.create_token(ctx, name="past", expires_at=utcnow() - timedelta(days=1))
    assert tokens.parse_duration("30d") == timedelta(days=30)
    with pytest.raises(InvalidInputError) as bad:
        tokens.parse_duration("forever")
    assert bad.value.field == "expires"
    # a duration past any date (schemathesis found 864311w) is refused, naming the field
    with pytest.raises(InvalidInputError, match="longer than a token may live") as bad:
        tokens.parse_duration("864311w", field="expires_in")
    assert bad.value.field == "expires_in"
    assert tokens.parse_duration("521w") == timedelta(weeks=521)


def test_a_user_cannot_see_or_revoke_someone_elses_token(ctx: Context) -> None:
    principals.create_principal(ctx, name="hal")
    principals.create_principal(ctx, name="ivy")
    theirs, _ = tokens.create_token(ctx, name="t", principal="hal")
    _, mine = tokens.create_token(ctx, name="t", principal="ivy")
    ivy = ctx.as_principal(tokens.authenticate(ctx, secret=mine))
    assert [t.principal for t in tokens.list_tokens(ivy)] == ["ivy"]
    with pytest.raises(NotFoundError):
        tokens.revoke_token(ivy, token_id=theirs.id)
    with pytest.raises(PermissionDeniedError):
        tokens.create_token(ivy, name="x", principal="hal")


def test_last_used_is_written_at_most_once_a_minute(ctx: Context) -> None:
    tokens.forget_last_used()
    token, secret = tokens.create_token(ctx, name="busy")
    tokens.authenticate(ctx, secret=secret)
    with ctx.db.read() as s:
        first = s.scalar(select(TokenRow.last_used_at).where(TokenRow.id == token.id))
    assert first is not None
    for _ in range(20):
        tokens.authenticate(ctx, secret=secret)
    with ctx.db.read() as s:
        again = s.scalar(select(TokenRow.last_used_at).where(TokenRow.id == token.id))
    assert again == first  # twenty more requests, no more writes


def test_job_tokens_end_with_their_job(ctx: Context) -> None:
    principals.create_project(ctx, name="alpha")
    run = runs.create_run(ctx, project="alpha")
    secret = principals.issue_job_token(ctx, job_id="job1", project="alpha", run_id=run.id)
    job = ctx.as_principal(tokens.authenticate(ctx, secret=secret))
    assert job.actor == "job:job1" and job.principal.kind is PrincipalKind.JOB
    runs.heartbeat(job, run_id=run.id)
    with pytest.raises(PermissionDeniedError):
        runs.create_run(job, project="alpha")
    with pytest.raises(NotFoundError):
        runs.create_run(job, project="default")
    assert all(t.principal != "job-job1" for t in tokens.list_tokens(ctx))
    principals.revoke_job_tokens(ctx, job_id="job1")
    with pytest.raises(AuthenticationError):
        tokens.authenticate(ctx, secret=secret)
    principals.revoke_job_tokens(ctx, job_id="job1")  # idempotent
    principals.revoke_job_tokens(ctx, job_id="never-ran")
