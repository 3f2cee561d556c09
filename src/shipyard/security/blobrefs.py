"""Who may read a blob: the projects that uploaded it or whose records name it.

Blobs are content-addressed and shared by the whole store, so a digest alone must not open
another project's bytes. A project holds a reference to each blob it uploaded (``PUT``) and to
each blob its dataset versions, artifacts, model versions and job snapshots name; reading a blob
through a project needs the viewer role there and such a reference. A blob the project does not
reference is reported missing, exactly like one that is not stored. Server admins read any blob.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.context import Context
from shipyard.domain.principals import Role
from shipyard.errors import NotFoundError
from shipyard.security.rbac import authorize
from shipyard.store.queries import project_id
from shipyard.store.tables import BlobRefRow, ProjectRow


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
    returns how many references were new."""
    wanted = set(digests)
    if not wanted:
        return 0
    have = set(
        s.scalars(
            select(BlobRefRow.digest).where(
                BlobRefRow.project_id == project_pk, BlobRefRow.digest.in_(wanted)
            )
        )
    )
    missing = sorted(wanted - have)
    for digest in missing:
        s.add(BlobRefRow(project_id=project_pk, digest=digest))
    return len(missing)


__all__ = ["add_refs", "authorize_blob", "note_upload", "require_refs"]
