"""Garbage collection: reclaim blobs that nothing references, and temp files writers left.

A commit writes its blobs first and its version row last, so a commit that fails or is killed
leaves blobs that no version references (and, killed mid-write, temp files); so does an upload
that is never committed. ``collect_garbage`` reclaims them, mark and sweep:

1. **sweep temp files** older than the grace period (the blob store's ``tmp/`` and the server's
   ``uploads/``; a younger one may belong to a writer still streaming);
2. **mark** every digest the metadata references: each column named ``digest`` or ``*_digest``
   in every table (dataset manifests, run artifacts, model versions, job code snapshots, and any
   such column added later), then every file listed in every dataset manifest. Tables named
   ``blob*`` describe blobs (which project may read them) rather than use them, and do not
   count; their rows for swept blobs are deleted with the sweep. A manifest that cannot be read
   aborts the collection before anything is deleted: its files are unknown;
3. **sweep** each stored blob that is not marked and was last modified before the grace period
   started; the age is checked again right before each unlink. Writers refresh a blob's
   modification time when they store content that is already there, and a dataset commit refreshes
   each blob it references before recording it, so a commit in flight is never swept as long as it
   takes less than the grace period (default one hour).

Packed blobs (``blobs.packs``) are reclaimed a pack at a time: a pack none of whose blobs is
marked goes whole; one that is mostly garbage (``REPACK_GARBAGE`` of its bytes) has its marked
blobs copied into a new pack, published before the old one is removed; a pack modified within
the grace period is kept as it is. A chunked blob in use marks its chunks.

``dry_run`` deletes nothing and reports what would go, with the bytes. A run that deleted
something writes one ``blobs.gc`` audit event.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import String, Table, delete, select

from shipyard.blobs.store import StoredBlob
from shipyard.context import Context
from shipyard.data.datasets import deleted_versions, manifest_digests, reclaim_deleted
from shipyard.errors import InvalidInputError, ShipyardError
from shipyard.security import audit
from shipyard.security.rbac import require_server_admin
from shipyard.store.tables import Base

DEFAULT_GRACE_S = 3600.0
REPACK_GARBAGE = 0.5
UPLOADS_DIR = "uploads"  # the server's upload folder in the home (server/routers/blobs.py)
_UPLOAD_PREFIX = "upload-"


class GcReport(BaseModel):
    """What a collection found and did (``dry_run``: what it would do)."""

    dry_run: bool
    grace_s: float
    referenced: int  # distinct digests the metadata references
    scanned: int  # blobs in the store
    swept: int  # unreferenced blobs removed (or that would be)
    swept_bytes: int
    kept_recent: int  # unreferenced but younger than the grace period: kept
    kept_recent_bytes: int
    temp_files: int  # stale temp files removed (or that would be)
    temp_bytes: int
    packs_removed: int = 0  # packs removed whole, or rewritten without their garbage
    packs_rewritten: int = 0  # of those, how many had live blobs copied to a new pack first
    versions_reclaimed: int = 0  # soft-deleted dataset versions let go of (or that would be)


def collect_garbage(
    ctx: Context, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False
) -> GcReport:
    """Mark from every version, artifact, model and snapshot; sweep what is older than
    ``grace_s`` seconds and unreferenced. Server admins only (the local user is one)."""
    require_server_admin(ctx, what="garbage collection")
    if not isinstance(grace_s, (int, float)) or grace_s != grace_s or grace_s < 0:
        raise InvalidInputError(
            f"grace period {grace_s!r} must be a number of seconds >= 0", field="grace"
        )
    started = time.time()
    cutoff = started - grace_s

    temp = ctx.blobs.stale_temp(older_than_s=grace_s, remove=not dry_run)
    temp += _stale_uploads(ctx.settings.home / UPLOADS_DIR, cutoff=cutoff, remove=not dry_run)

    # soft-deleted dataset versions first: once reclaimed, none can be restored meanwhile
    reclaimed = deleted_versions(ctx) if dry_run else reclaim_deleted(ctx)
    marked = referenced_digests(ctx)
    marked |= ctx.blobs.chunks_of(marked)
    removed: list[str] = []
    scanned = swept = swept_bytes = kept = kept_bytes = 0
    packs: dict[str, list[StoredBlob]] = {}
    for blob in ctx.blobs.iter_blobs():
        scanned += 1
        if blob.pack is not None:
            packs.setdefault(blob.pack, []).append(blob)
            continue
        if blob.digest in marked:
            continue
        if blob.mtime is None or blob.mtime > cutoff:
            kept += 1
            kept_bytes += blob.size
            continue
        if dry_run or ctx.blobs.remove(blob.digest, unless_newer_than=cutoff):
            swept += 1
            swept_bytes += blob.size
            removed.append(blob.digest)
        # else: refreshed by a writer (or removed by another collector) since it was listed
    outcome = _sweep_packs(ctx, packs, marked=marked, cutoff=cutoff, dry_run=dry_run)
    swept += outcome.swept
    swept_bytes += outcome.swept_bytes
    kept += outcome.kept
    kept_bytes += outcome.kept_bytes
    removed += outcome.removed

    report = GcReport(
        dry_run=dry_run,
        grace_s=float(grace_s),
        referenced=len(marked),
        scanned=scanned,
        swept=swept,
        swept_bytes=swept_bytes,
        kept_recent=kept,
        kept_recent_bytes=kept_bytes,
        temp_files=len(temp),
        temp_bytes=sum(size for _, size in temp),
        packs_removed=outcome.packs_removed,
        packs_rewritten=outcome.packs_rewritten,
        versions_reclaimed=reclaimed,
    )
    if not dry_run and (swept or temp or reclaimed):
        # claims on blobs that are gone (unless an upload stored the content again meanwhile)
        gone = [d for d in removed if not ctx.blobs.exists(d)]
        with ctx.db.transaction() as s:
            for table in _claim_tables():
                for start in range(0, len(gone), 500):
                    s.execute(delete(table).where(table.c.digest.in_(gone[start : start + 500])))
            audit.record(
                s,
                actor=ctx.actor,
                action="blobs.gc",
                resource="blobs",
                details=report.model_dump(),
            )
    return report


def referenced_digests(ctx: Context) -> set[str]:
    """Every blob digest the metadata references, dataset manifests' files included."""
    marked: set[str] = set()
    manifests: set[str] = set()
    with ctx.db.read() as s:
        for table in Base.metadata.sorted_tables:
            if table.name.startswith("blob"):
                continue
            for column in table.columns:
                if not _is_digest_column(column.name, column.type):
                    continue
                query = select(column).where(column.is_not(None))
                if table.name == "dataset_versions":  # a soft-deleted version holds nothing
                    query = query.where(table.c.deleted_at.is_(None))
                values = s.scalars(query.distinct())
                found = {v for v in values if isinstance(v, str)}
                marked |= found
                if table.name == "dataset_versions" and column.name == "manifest_digest":
                    manifests |= found
    for digest in sorted(manifests):  # blob reads: outside the read transaction
        try:
            marked |= manifest_digests(ctx, digest)
        except ShipyardError as exc:
            raise type(exc)(
                f"garbage collection stopped before deleting anything: the dataset manifest "
                f"{digest} cannot be read ({exc.message}), so the files it lists are unknown; "
                "restore the manifest blob, then run it again",
                field="manifest_digest",
                digest=digest,
            ) from exc
    return marked


# --- helpers ------------------------------------------------------------------------------------


@dataclass
class _PackSweep:
    swept: int = 0
    swept_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    packs_removed: int = 0
    packs_rewritten: int = 0
    removed: list[str] = field(default_factory=list)


def _sweep_packs(
    ctx: Context,
    packs: dict[str, list[StoredBlob]],
    *,
    marked: set[str],
    cutoff: float,
    dry_run: bool,
) -> _PackSweep:
    """Remove packs that hold only garbage, rewrite those that are mostly garbage."""
    out = _PackSweep()
    for name, blobs in sorted(packs.items()):
        garbage = [b for b in blobs if b.digest not in marked]
        if not garbage:
            continue
        if blobs[0].mtime is None or blobs[0].mtime > cutoff:
            out.kept += len(garbage)
            out.kept_bytes += sum(b.size for b in garbage)
            continue
        total = sum(b.size for b in blobs)
        waste = sum(b.size for b in garbage)
        live = len(garbage) < len(blobs)
        if live and waste < REPACK_GARBAGE * total:
            continue  # mostly in use: rewriting it would copy more than it frees
        keep = {b.digest for b in blobs if b.digest in marked}
        if dry_run or ctx.blobs.remove_pack(name, keep=keep, unless_newer_than=cutoff):
            out.swept += len(garbage)
            out.swept_bytes += waste
            out.packs_removed += 1
            out.packs_rewritten += int(live)
            out.removed += [b.digest for b in garbage]
    return out


def _claim_tables() -> list[Table]:
    return [
        t
        for t in Base.metadata.sorted_tables
        if t.name.startswith("blob") and "digest" in t.c and isinstance(t.c.digest.type, String)
    ]


def _is_digest_column(name: str, kind: object) -> bool:
    return (name == "digest" or name.endswith("_digest")) and isinstance(kind, String)


def _stale_uploads(folder: Path, *, cutoff: float, remove: bool) -> list[tuple[Path, int]]:
    found: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        if not entry.name.startswith(_UPLOAD_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or info.st_mtime > cutoff:
                continue
            if remove:
                os.unlink(entry.path)
            found.append((Path(entry.path), info.st_size))
        except OSError:  # gone meanwhile, or read-only: best effort
            continue
    return found
