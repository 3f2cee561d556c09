"""API tokens: shown once at creation, stored only as a SHA-256 hash, owned by a principal.

Tokens are 256 random bits, so a fast hash is enough (no password stretching needed); the stored
prefix lets a user tell tokens apart without revealing them. A token acts as its principal
(a user, a service account or a job), optionally narrowed to one project and a lower role, until
it expires or is revoked. ``authenticate`` turns a presented secret into that
:class:`~shipyard.domain.principals.Principal`, and notes when the token was last used - at most
once a minute per token and process, so a busy client does not cost a write per request.

``verified_principal`` is the inference gateway's shortcut: the principal of a token that
``authenticate`` accepted in this process less than ``VERIFIED_TTL_S`` seconds ago, from memory,
without a database read. The cache is keyed by the token's SHA-256 (never the secret) and the
database, holds no entry past the token's expiry, and is emptied whenever this process revokes
a token, disables a principal or changes a membership or the projects
(``forget_verified``); a change made by another process (the CLI on the server host) takes
effect within ``VERIFIED_TTL_S``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shipyard.context import Context, new_id
from shipyard.domain.models import Token
from shipyard.domain.names import validate_name
from shipyard.domain.principals import (
    LOCAL_PRINCIPAL_ID,
    Principal,
    PrincipalKind,
    Role,
)
from shipyard.errors import (
    AuthenticationError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PermissionDeniedError,
    storage_fault,
)
from shipyard.security import audit
from shipyard.security.rbac import project_not_found, require_server_admin, role_in
from shipyard.store.tables import (
    PrincipalRow,
    ProjectMemberRow,
    ProjectRow,
    TokenRow,
    aware,
    utcnow,
)

TOKEN_PREFIX = "shp_"
# the server-admin user that owns tokens made by the local admin (``shipyard token create``)
BOOTSTRAP_ADMIN = "admin"
LAST_USED_EVERY_S = 60.0
MAX_EXPIRY = timedelta(days=3650)
HOW_TO_GET_ONE = (
    "see your tokens with 'shipyard token list' (GET /api/v1/tokens) and make a new one with "
    "'shipyard token create NAME' (POST /api/v1/tokens)"
)
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([mhdw])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

VERIFIED_TTL_S = 5.0
MAX_VERIFIED = 10_000

_last_used_lock = threading.Lock()
_last_used: dict[str, float] = {}  # token id -> monotonic time of this process's last write
_verified_lock = threading.Lock()
# (database URL, token hash) -> (principal, monotonic deadline)
_verified: dict[tuple[str, str], tuple[Principal, float]] = {}
_verified_epoch = 0  # bumped by forget_verified: a check that began before it is not cached


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    ctx: Context,
    *,
    name: str,
    principal: str | None = None,
    project: str | None = None,
    role: Role | str | None = None,
    expires_at: datetime | None = None,
) -> tuple[Token, str]:
    """Create a token; returns its record and the secret, which is never stored or shown again.

    ``principal``: the user or service account it acts as (default: the caller; the local admin's
    tokens belong to the server-admin user ``admin``). Only server admins make tokens for others.
    ``project``/``role`` narrow it; ``expires_at`` ends it (at most ten years ahead).
    """
    validate_name(name, field="name")
    narrowed_role = None if role is None else Role.parse(role)
    if project is not None:
        validate_name(project, field="project")
    if expires_at is not None:
        expires_at = _check_expiry(expires_at)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with ctx.db.transaction() as s:
        owner = _owner(ctx, s, principal)
        if owner.kind == PrincipalKind.JOB.value:
            raise PermissionDeniedError(
                "job principals get their tokens from the server when their job starts",
                field="principal",
            )
        if owner.disabled_at is not None:
            raise InvalidStateError(
                f"{owner.name!r} is disabled, so a token of theirs would never work; give the "
                "token to someone else with --user NAME",
                field="principal",
            )
        if project is not None:
            _check_narrowing(s, owner, project)
        row = TokenRow(
            id=new_id(),
            name=name,
            prefix=secret[:10],
            token_hash=hash_token(secret),
            principal_id=owner.id,
            project=project,
            role=narrowed_role.value if narrowed_role else None,
            expires_at=expires_at,
        )
        s.add(row)
        details: dict[str, object] = {"name": name}
        if owner.id != ctx.principal.id:
            details["principal"] = owner.name
        if project is not None:
            details["project"] = project
        if narrowed_role is not None:
            details["role"] = narrowed_role.value
        if expires_at is not None:
            details["expires_at"] = expires_at.isoformat()
        audit.record(
            s, actor=ctx.actor, action="token.create", resource=f"token/{row.id}", details=details
        )
        s.flush()
        token = _to_domain(row, owner)
    return token, secret


def authenticate(ctx: Context, *, secret: str | None) -> Principal:
    """The principal a presented token acts as, or :class:`AuthenticationError` (401)."""
    if not secret:
        raise AuthenticationError(
            "this server requires an API token: pass 'Authorization: Bearer <token>' "
            "(create one with 'shipyard token create NAME' on the server host)",
            field="token",
        )
    digest = hash_token(secret)
    now = utcnow()
    epoch = _verified_epoch
    with ctx.db.read() as s:
        row = s.scalar(select(TokenRow).where(TokenRow.token_hash == digest))
        # compare_digest keeps the final comparison constant-time
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            raise AuthenticationError(
                f"the API token is not valid (revoked or mistyped?): {HOW_TO_GET_ONE}",
                field="token",
            )
        if row.revoked_at is not None:
            raise AuthenticationError(
                f"the API token {row.name} ({row.prefix}...) was revoked: {HOW_TO_GET_ONE}",
                field="token",
            )
        expires = aware(row.expires_at)
        if expires is not None and expires <= now:
            raise AuthenticationError(
                f"the API token {row.name} ({row.prefix}...) expired at {expires.isoformat()}: "
                f"{HOW_TO_GET_ONE}",
                field="token",
            )
        owner = s.get(PrincipalRow, row.principal_id) if row.principal_id else None
        if owner is None or owner.disabled_at is not None:
            raise AuthenticationError(
                f"the API token {row.name} ({row.prefix}...) belongs to no active user or "
                f"service account: {HOW_TO_GET_ONE}",
                field="token",
            )
        principal = load_principal(s, owner, token=row)
        token_id = row.id
    _note_use(ctx, token_id, now)
    _remember(ctx, digest, principal, expires=expires, now=now, epoch=epoch)
    return principal


def verified_principal(ctx: Context, *, secret: str) -> Principal | None:
    """The principal of ``secret`` if ``authenticate`` accepted it within ``VERIFIED_TTL_S``
    and nothing in this process has revoked or changed access since; else None (then call
    ``authenticate``, which checks the store and refreshes this)."""
    entry = _verified.get((ctx.settings.database_url, hash_token(secret)))
    if entry is None or entry[1] <= time.monotonic():
        return None
    return entry[0]


def forget_verified() -> None:
    """Drop every verified token from memory: the next request of each is checked in the store.
    Called on every change of who may do what (revocations, disabled principals, memberships,
    new projects)."""
    global _verified_epoch
    with _verified_lock:
        _verified_epoch += 1
        _verified.clear()


def list_tokens(ctx: Context, *, principal: str | None = None) -> list[Token]:
    """Tokens, oldest first: the caller's own; a server admin's view is everybody's (or those of
    ``principal``). Job tokens are left out (they live and die with their job)."""
    with ctx.db.read() as s:
        query = (
            select(TokenRow, PrincipalRow)
            .join(PrincipalRow, PrincipalRow.id == TokenRow.principal_id, isouter=True)
            .order_by(TokenRow.created_at, TokenRow.id)
        )
        if not ctx.principal.server_admin:
            query = query.where(TokenRow.principal_id == ctx.principal.id)
        elif principal is not None:
            owner = _principal_named(s, principal)
            query = query.where(TokenRow.principal_id == owner.id)
        return [
            _to_domain(t, p)
            for t, p in s.execute(query).all()
            if p is None or p.kind != PrincipalKind.JOB.value
        ]


def revoke_token(ctx: Context, *, token_id: str) -> Token:
    """Revoke a token (idempotent): one's own, or any as a server admin. Someone else's token
    is reported missing, like one that does not exist."""
    with ctx.db.transaction() as s:
        row = s.get(TokenRow, token_id)
        if row is None or (not ctx.principal.server_admin and row.principal_id != ctx.principal.id):
            raise NotFoundError(
                f"token {token_id!r} does not exist; list yours with 'shipyard token list'",
                field="token_id",
            )
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            audit.record(
                s,
                actor=ctx.actor,
                action="token.revoke",
                resource=f"token/{row.id}",
                details={"name": row.name},
            )
        owner = s.get(PrincipalRow, row.principal_id) if row.principal_id else None
        s.flush()
        token = _to_domain(row, owner)
    forget_verified()
    return token


def parse_duration(text: str, *, field: str = "expires") -> timedelta:
    """``90m``, ``12h``, ``30d`` or ``8w`` as a duration."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise InvalidInputError(
            f"{field} {text!r} is not a duration: write a number and a unit, e.g. 90m, 12h, "
            "30d or 8w",
            field=field,
        )
    seconds = int(match[1]) * _UNITS[match[2]]
    if seconds > MAX_EXPIRY.total_seconds():
        raise InvalidInputError(
            f"{field} {text!r} is longer than a token may live ({MAX_EXPIRY.days} days); "
            "choose a shorter duration",
            field=field,
        )
    return timedelta(seconds=seconds)


def load_principal(s: Session, row: PrincipalRow, *, token: TokenRow | None = None) -> Principal:
    """The principal of ``row`` with its roles per project, narrowed as ``token`` says."""
    narrowed = token is not None and (token.project is not None or token.role is not None)
    server_admin = row.server_admin and not narrowed
    if row.server_admin and narrowed:
        # a narrowed server-admin token is a project admin wherever it still reaches
        roles = {name: Role.ADMIN for name in s.scalars(select(ProjectRow.name))}
    else:
        roles = {
            name: Role(role)
            for name, role in s.execute(
                select(ProjectRow.name, ProjectMemberRow.role)
                .join(ProjectRow, ProjectRow.id == ProjectMemberRow.project_id)
                .where(ProjectMemberRow.principal_id == row.id)
            ).all()
        }
    return Principal(
        id=row.id,
        name=row.name,
        kind=PrincipalKind(row.kind),
        server_admin=server_admin,
        roles=roles,
        token_project=token.project if token else None,
        token_role=Role(token.role) if token is not None and token.role else None,
        job_id=row.job_id,
        run_id=row.run_id,
    )


def forget_last_used() -> None:
    """Forget when tokens were last noted as used (tests)."""
    with _last_used_lock:
        _last_used.clear()


def _remember(
    ctx: Context,
    digest: str,
    principal: Principal,
    *,
    expires: datetime | None,
    now: datetime,
    epoch: int,
) -> None:
    """Keep an accepted token's principal for ``verified_principal`` (not past its expiry, and
    not when access changed while it was being checked)."""
    ttl = VERIFIED_TTL_S
    if expires is not None:
        ttl = min(ttl, (expires - now).total_seconds())
    deadline = time.monotonic() + ttl
    with _verified_lock:
        if epoch != _verified_epoch:
            return
        if len(_verified) >= MAX_VERIFIED:
            _verified.clear()
        _verified[(ctx.settings.database_url, digest)] = (principal, deadline)


# --- helpers ------------------------------------------------------------------------------------


def _note_use(ctx: Context, token_id: str, now: datetime) -> None:
    tick = time.monotonic()
    with _last_used_lock:
        last = _last_used.get(token_id)
        if last is not None and tick - last < LAST_USED_EVERY_S:
            return
        _last_used[token_id] = tick
    try:
        with ctx.db.transaction() as s:
            s.execute(update(TokenRow).where(TokenRow.id == token_id).values(last_used_at=now))
    except Exception as exc:
        # bookkeeping only: a full or read-only disk must not turn a read away (tried again
        # the next minute)
        if storage_fault(exc, where="the metadata database") is None:
            raise


def _owner(ctx: Context, s: Session, principal: str | None) -> PrincipalRow:
    if principal is None or (principal == ctx.principal.name and not _is_local(ctx)):
        if _is_local(ctx):
            return _bootstrap_admin(s)
        own = s.get(PrincipalRow, ctx.principal.id)
        if own is None:
            raise NotFoundError(
                "the caller has no principal record to own a token", field="principal"
            )
        return own
    require_server_admin(ctx, what="making tokens for someone else")
    return _principal_named(s, principal)


def _is_local(ctx: Context) -> bool:
    return ctx.principal.id == LOCAL_PRINCIPAL_ID


def _bootstrap_admin(s: Session) -> PrincipalRow:
    """The server-admin user ``admin`` that the host's own tokens belong to (made on first use)."""
    row = s.scalar(select(PrincipalRow).where(PrincipalRow.name == BOOTSTRAP_ADMIN))
    if row is not None and not row.server_admin:
        raise InvalidStateError(
            f"the user {BOOTSTRAP_ADMIN!r} is not a server admin, so a token of the server host "
            "would not be one either; name the token's owner with --user NAME (or create a "
            "server admin with 'shipyard users create NAME --admin')",
            field="principal",
        )
    if row is None:
        row = PrincipalRow(
            id=new_id(), name=BOOTSTRAP_ADMIN, kind=PrincipalKind.USER.value, server_admin=True
        )
        s.add(row)
        s.flush()
    return row


def _principal_named(s: Session, name: str) -> PrincipalRow:
    row = s.scalar(select(PrincipalRow).where(PrincipalRow.name == name))
    if row is None:
        raise NotFoundError(
            f"no user or service account is named {name!r}; see 'shipyard users list'",
            field="principal",
        )
    return row


def _check_narrowing(s: Session, owner: PrincipalRow, project: str) -> None:
    exists = s.scalar(select(ProjectRow.id).where(ProjectRow.name == project))
    if exists is None or role_in(load_principal(s, owner), project) is None:
        raise project_not_found(project)


def _check_expiry(expires_at: datetime) -> datetime:
    if expires_at.tzinfo is None:
        raise InvalidInputError(
            "expires_at needs a time zone (e.g. 2030-01-01T00:00:00Z)", field="expires_at"
        )
    now = utcnow()
    if expires_at <= now:
        raise InvalidInputError("expires_at is in the past", field="expires_at")
    if expires_at - now > MAX_EXPIRY:
        raise InvalidInputError("expires_at is more than ten years ahead", field="expires_at")
    return expires_at


def _to_domain(row: TokenRow, owner: PrincipalRow | None) -> Token:
    return Token(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=aware(row.created_at) or utcnow(),
        last_used_at=aware(row.last_used_at),
        principal=owner.name if owner is not None else None,
        project=row.project,
        role=row.role,
        expires_at=aware(row.expires_at),
        revoked_at=aware(row.revoked_at),
    )
