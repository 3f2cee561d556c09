"""Who is calling: principals (users, service accounts, jobs) and their roles per project.

A principal holds one role per project it is a member of (viewer < editor < admin) and may be a
server admin (everything, everywhere). A token belongs to one principal and may narrow it to one
project and a lower role. Pure data: the checks live in ``shipyard.security.rbac``.
"""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from shipyard.errors import InvalidInputError


class Role(str, enum.Enum):
    VIEWER = "viewer"
    EDITOR = "editor"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role includes ``needed`` (admin includes editor includes viewer)."""
        return self.rank >= Role(needed).rank

    @staticmethod
    def lowest(a: Role | None, b: Role | None) -> Role | None:
        """The weaker of two roles; ``None`` (no limit) when neither is given."""
        if a is None:
            return b
        if b is None:
            return a
        return a if a.rank <= b.rank else b

    @staticmethod
    def parse(value: Role | str, *, field: str = "role") -> Role:
        """``value`` as a role, or ``InvalidInputError`` naming the roles there are."""
        try:
            return Role(value)
        except ValueError:
            raise InvalidInputError(
                f"{field} {value!r} is not one of viewer, editor, admin", field=field
            ) from None


_RANK = {Role.VIEWER: 0, Role.EDITOR: 1, Role.ADMIN: 2}


class PrincipalKind(str, enum.Enum):
    USER = "user"
    SERVICE = "service"
    JOB = "job"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Principal(_Frozen):
    """The caller of a service. ``roles`` maps project names to the principal's role there;
    ``token_project``/``token_role`` are what the presented token narrows it to."""

    id: str
    name: str
    kind: PrincipalKind
    server_admin: bool = False
    roles: dict[str, Role] = Field(default_factory=dict)
    token_project: str | None = None
    token_role: Role | None = None
    job_id: str | None = None
    run_id: str | None = None

    @property
    def actor(self) -> str:
        """The name audit events record: ``local``, ``user:alice``, ``service:ci``, ``job:<id>``."""
        if self.id == LOCAL_PRINCIPAL_ID:
            return "local"
        if self.kind is PrincipalKind.JOB:
            return f"job:{self.job_id or self.name}"
        return f"{self.kind.value}:{self.name}"


class PrincipalInfo(_Frozen):
    """A principal as the users/service-accounts API lists it (no token narrowing)."""

    id: str
    name: str
    kind: PrincipalKind
    server_admin: bool = False
    created_at: datetime
    disabled: bool = False


class Project(_Frozen):
    name: str
    created_at: datetime


class Member(_Frozen):
    project: str
    principal: str
    kind: PrincipalKind
    role: Role


LOCAL_PRINCIPAL_ID = "local"
LOCAL_PRINCIPAL = Principal(
    id=LOCAL_PRINCIPAL_ID, name="local", kind=PrincipalKind.USER, server_admin=True
)

__all__ = [
    "LOCAL_PRINCIPAL",
    "LOCAL_PRINCIPAL_ID",
    "Member",
    "Principal",
    "PrincipalInfo",
    "PrincipalKind",
    "Project",
    "Role",
]
