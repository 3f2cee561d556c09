"""Who may read a blob: the projects that uploaded it or whose records name it.

Blobs are content-addressed and shared by the whole store, so a digest alone must not open
another project's bytes. A project holds a reference to each blob it uploaded (``PUT``) and to
each blob its dataset versions, artifacts, model versions and job snapshots name; reading a blob
through a project needs the viewer role there and such a reference. A blob the project does not
reference is reported missing, exactly like one that is not stored. Server admins read any blob.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from shipyard.context import Context
from shipyard.domain.principals import Role
from shipyard.errors import NotFoundError
from shipyard.security.rbac import authorize
from shipyard.store.queries import project_id
from shipyard.store.tables import BlobRefRow, ProjectRow, utcnow

_REFS_PER_QUERY = 5000  # digests per IN (...) query: SQLite caps a statement's parameters


def authorize_blob(ctx: Context, *, project: str, digest: str, need: Role) -> None:
    """Raise unless the caller may ``need`` blob ``digest`` through ``project``: reading needs a
    reference from the project; writing (an upload) the editor role (jobs may upload too)."""
    authorize(ctx, project=project, need=need, uploads_blob=need is not Role.VIEWER)
    if need is not Role.VIEWER or ctx.principal.server_admin:
        return
    with ctx.db.read() as s:
        found = s.scalar(
            select(BlobRefRow.digest)
            .join(ProjectRow, ProjectRow.id == BlobRefRow.project_id)
            .where(ProjectRow.name == project, BlobRefRow.digest == digest)
        )
    if found is None:
        raise NotFoundError(
            f"blob {digest} is not in the store at {ctx.blobs.url}", field="digest", digest=digest
        )


def require_refs(ctx: Context, *, project: str, digests: Iterable[str], field: str) -> None:
    """Raise ``NotFoundError`` (as for a missing blob) for the first of ``digests`` that
    ``project`` does not reference: a record may only name blobs its project holds, so knowing a
    digest does not bring another project's bytes in. Server admins are not checked."""
    wanted = set(digests)
    if ctx.principal.server_admin or not wanted:
        return
    with ctx.db.read() as s:
        have = set(
            s.scalars(
                select(BlobRefRow.digest)
                .join(ProjectRow, ProjectRow.id == BlobRefRow.project_id)
                .where(ProjectRow.name == project, BlobRefRow.digest.in_(wanted))
            )
        )
    for digest in sorted(wanted - have):
        raise NotFoundError(
            f"blob {digest} is not in the store at {ctx.blobs.url}; upload it first",
            field=field,
            digest=digest,
        )


def note_upload(ctx: Context, *, project: str, digest: str) -> None:
    """Record that ``project`` holds blob ``digest`` (after an upload)."""
    with ctx.db.transaction() as s:
        add_refs(s, project_pk=project_id(s, project, create=True), digests=[digest])


def add_refs(s: Session, *, project_pk: str, digests: Iterable[str]) -> int:
    """Inside a service's transaction: ``project_pk`` (a project's id) references ``digests``;
    returns how many references were new. The existing ones are read in slices (a statement has
    a bounded number of parameters) and the missing ones inserted in one executemany, not one
    ORM object each (20,000 files: seconds -> tens of milliseconds)."""
    wanted = sorted(set(digests))
    have: set[str] = set()
    for start in range(0, len(wanted), _REFS_PER_QUERY):
        part = wanted[start : start + _REFS_PER_QUERY]
        have.update(
            s.scalars(
                select(BlobRefRow.digest).where(
                    BlobRefRow.project_id == project_pk, BlobRefRow.digest.in_(part)
                )
            )
        )
    missing = [d for d in wanted if d not in have]
    if missing:
        now = utcnow()
        s.execute(
            insert(BlobRefRow),
            [{"project_id": project_pk, "digest": d, "created_at": now} for d in missing],
        )
    return len(missing)


def missing_refs(ctx: Context, *, project: str, digests: Iterable[str]) -> set[str]:
    """Which of ``digests`` ``project`` does not reference (none for a server admin)."""
    wanted = sorted(set(digests))
    if ctx.principal.server_admin or not wanted:
        return set()
    have: set[str] = set()
    with ctx.db.read() as s:
        pid = project_id(s, project, create=False)
        for start in range(0, len(wanted), _REFS_PER_QUERY):
            part = wanted[start : start + _REFS_PER_QUERY]
            have.update(
                s.scalars(
                    select(BlobRefRow.digest).where(
                        BlobRefRow.project_id == pid, BlobRefRow.digest.in_(part)
                    )
                )
            )
    return set(wanted) - have


__all__ = ["add_refs", "authorize_blob", "missing_refs", "note_upload", "require_refs"]
