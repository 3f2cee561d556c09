"""Datasets: immutable, content-addressed versions of a set of files.

A version is a manifest (a Parquet table of ``path, digest, size`` sorted by path, itself stored
as a blob), a profile (file count, bytes, per-table statistics) and validation results. File
content lives in the blob store, named by its BLAKE3 digest, so identical content is stored once
however many versions or datasets share it.

``commit_files`` is the one commit path: the embedded SDK reaches it through ``commit_directory``
(which puts the files into the blob store first) and the server through the REST route (remote
clients upload blobs, then send the manifest). Everything that reads blobs - checking them,
profiling tables, loading the previous manifest - happens before the write transaction; the
transaction only allocates the version number, inserts the row and its audit event. A process
killed mid-commit therefore leaves at worst some unreferenced blobs, never a partial version.
"""

from __future__ import annotations

import logging
import os
import re
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from sqlalchemy import delete as sa_delete
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shipyard.blobs.store import SourceFile, check_digest, check_stored
from shipyard.context import Context, new_id
from shipyard.data import quality, worktree
from shipyard.data.scan import ScannedFile, check_path, scan_source
from shipyard.data.statcache import StatCache
from shipyard.data.worktree import CheckoutResult, LinkMode, WorktreeStatus
from shipyard.domain.models import (
    Dataset,
    DatasetProfile,
    DatasetVersion,
    FileEntry,
    TableProfile,
    ValidationResult,
)
from shipyard.domain.names import validate_name, validate_relative_path
from shipyard.domain.principals import Role
from shipyard.errors import ConflictError, InvalidInputError, NotFoundError
from shipyard.security import audit
from shipyard.security.blobrefs import add_refs, require_refs
from shipyard.security.rbac import authorize
from shipyard.store.engine import lock
from shipyard.store.queries import project_id
from shipyard.store.tables import (
    DatasetRow,
    DatasetTagRow,
    DatasetVersionRow,
    LockRow,
    ProjectRow,
    aware,
    utcnow,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""``progress(done_bytes, total_bytes, path)``, called after each file."""

VersionRef = int | str | None
"""A version: ``3``, ``"3"``, ``"v3"``, or ``None`` / ``"latest"`` for the newest one."""

TABLE_SUFFIXES = (".parquet", ".csv")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("digest", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
    ]
)

_COMMIT_ATTEMPTS = 5
_MAX_STRING_BYTES = 2**31 - 1  # a string column's 32-bit offsets
_VERSION_RE = re.compile(r"^v?([0-9]{1,9})$")


# --- commits ------------------------------------------------------------------------------------


def commit_files(
    ctx: Context,
    *,
    project: str,
    name: str,
    files: Sequence[FileEntry],
    message: str = "",
    progress: Progress | None = None,
    checks: quality.Suite | None = None,
) -> DatasetVersion:
    """Record ``files`` (already in ``ctx.blobs``) as the next version of dataset ``name``.

    Every path must be a safe relative path, unique, and not also a folder of another path;
    every digest must name a stored blob of exactly the stated size. Nothing is written unless all
    of that holds. When the files are exactly those of the latest version, that version is
    returned and nothing is written, so retrying a commit is harmless (the new ``message`` is then
    ignored). ``progress`` reports the checking and profiling pass over the files.

    A blob that the previous version does not already hold is re-hashed first: one whose stored
    content went bad is moved aside and the commit refused with a 409 naming the blob and the
    path, so that uploading the file again (then retrying) stores it whole.
    """
    return _commit(
        ctx,
        project=project,
        name=name,
        files=files,
        message=message,
        progress=progress,
        verified=frozenset(),
        checks=checks,
    )


def commit_stored(
    ctx: Context,
    *,
    project: str,
    name: str,
    files: Sequence[FileEntry],
    message: str = "",
    stored: frozenset[str],
    profiles: Mapping[str, TableProfile],
) -> DatasetVersion:
    """:func:`commit_files` for files this process has just put into ``ctx.blobs``: ``stored``
    holds the digests of the blobs that the put created (their content hashed on the way in,
    as :func:`commit_directory` trusts its own), which are not re-hashed; ``profiles`` maps
    digests of tables to their profile as :func:`~shipyard.data.profile.profile_table` gives
    it for the file's content (``path`` is set per entry), so those tables are not read again
    to profile them. Everything else is checked as by ``commit_files``; a digest in neither is
    re-hashed and profiled as usual. For in-process callers that wrote the files (batch
    inference), never for content from a client."""
    return _commit(
        ctx,
        project=project,
        name=name,
        files=files,
        message=message,
        progress=None,
        verified=frozenset(stored),
        profiles=profiles,
    )


def _commit(
    ctx: Context,
    *,
    project: str,
    name: str,
    files: Sequence[FileEntry],
    message: str,
    progress: Progress | None,
    verified: frozenset[str],
    checks: quality.Suite | None = None,
    profiles: Mapping[str, TableProfile] | None = None,
) -> DatasetVersion:
    validate_name(project, field="project")
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.EDITOR)
    base = _latest_version(ctx, project=project, name=name)
    base_files = _read_manifest(ctx, base.manifest_digest) if base else []
    # The previous version's blobs are referenced, so stored (the collector keeps them): only
    # the others are looked up in the store.
    entries = _check_entries(ctx, files, trusted={f.digest: f.size for f in base_files})
    total = sum(e.size for e in entries)
    if base is not None and base_files == entries:
        return base
    known = {f.digest for f in base_files}
    require_refs(
        ctx, project=project, digests={e.digest for e in entries} - known, field="files.digest"
    )
    _verify_blobs(ctx, files, skip=verified | {f.digest for f in base_files})
    profile, validation = quality.inspect(
        ctx,
        entries,
        suite=quality.suite_for(ctx, entries, checks=checks),
        parent_files=base_files,
        known={**(profiles or {}), **_known_tables(base, base_files)},
        progress=progress,
    )
    manifest_digest = ctx.blobs.put_bytes(_manifest_bytes(entries)).digest

    for _ in range(_COMMIT_ATTEMPTS):
        committed = _insert_version(
            ctx,
            project=project,
            name=name,
            base_id=base.id if base else None,
            manifest_digest=manifest_digest,
            file_count=len(entries),
            total_bytes=total,
            new_bytes=_new_bytes(entries, base_files),
            profile=profile,
            validation=validation,
            message=message,
            # the previous version's blobs are referenced by the project already
            digests=[manifest_digest, *({e.digest for e in entries} - known)],
        )
        if committed is not None:
            return committed
        # Another writer committed in between: compare with its version and try again.
        base = _latest_version(ctx, project=project, name=name)
        base_files = _read_manifest(ctx, base.manifest_digest) if base else []
        if base is not None and base_files == entries:
            return base
    raise ConflictError(
        f"dataset {name!r} kept changing while committing (other writers); try again",
        field="name",
    )


def commit_directory(
    ctx: Context,
    *,
    project: str,
    name: str,
    source: Path,
    message: str = "",
    progress: Progress | None = None,
    checks: quality.Suite | None = None,
) -> DatasetVersion:
    """Put every file under ``source`` into the blob store and commit them as the next version.

    A single file is committed under its base name. A file whose stamps (inode, size, mtime,
    ctime) are those the stat cache recorded is not read again; the others are hashed and stored
    by ``BlobStore.put_files`` (small ones packed, large ones chunked; identical content is
    stored once); ``progress`` reports that pass. Every path is checked before the first byte is
    stored, so a symlink that points out of ``source`` (or, for a single file, out of its
    folder), a hard link, or an unsafe file name (an :class:`UnsafePathError` naming it) leaves
    the store untouched. A file that changes while it is read fails the commit
    (``FileChangedError``, 409) and nothing is committed.
    """
    validate_name(project, field="project")
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.EDITOR)
    source = Path(source)
    found = scan_source(source)
    root = Path(os.path.realpath(source if source.is_dir() else source.parent))
    base = _latest_version(ctx, project=project, name=name)
    base_manifest = _manifest_columns(ctx, base.manifest_digest) if base else {}
    base_digests = {digest for digest, _ in base_manifest.values()}
    digests, created = _store_files(ctx, root, found, base_digests=base_digests, progress=progress)
    # checked again by _commit (paths, digests, sizes) before anything is recorded
    entries = [FileEntry.trusted(f.path, digests[f.path], f.size) for f in found]
    return _commit(
        ctx,
        project=project,
        name=name,
        files=entries,
        message=message,
        progress=None,
        verified=frozenset(created),
        checks=checks,
    )


def _store_files(
    ctx: Context,
    root: Path,
    found: list[ScannedFile],
    *,
    base_digests: set[str],
    progress: Progress | None,
) -> tuple[dict[str, str], set[str]]:
    """Each file's digest by path, and the digests this call stored (hashed on the way in)."""
    cache = stat_cache(ctx)
    known = cache.load(root)
    digests: dict[str, str] = {}
    todo: list[ScannedFile] = []
    total = sum(f.size for f in found)
    done = 0
    for f in found:
        hit = cache.lookup(known, f)
        if hit is not None and (hit in base_digests or ctx.blobs.exists(hit)):
            digests[f.path] = hit
            done += f.size
        else:
            todo.append(f)
    if progress is not None and done:
        progress(done, total, found[-1].path)
    hashed_at = time.time_ns()
    by_real = {f.real: f for f in todo}

    def stored(source: SourceFile) -> None:
        nonlocal done
        done += source.size
        if progress is not None:
            progress(done, max(total, done), by_real[str(source.path)].path)

    puts = ctx.blobs.put_files(
        [SourceFile(f.real, f.size, f.mtime_ns, f.ctime_ns, shown=f.path) for f in todo],
        progress=stored,
    )
    for f, put in zip(todo, puts, strict=True):
        digests[f.path] = put.digest
    gone = known.keys() - digests.keys()
    cache.save(root, [(f, digests[f.path]) for f in todo], hashed_at_ns=hashed_at, gone=gone)
    return digests, {p.digest for p in puts if p.created}


def stat_cache(ctx: Context) -> StatCache:
    """This home's stat cache (``data.statcache``)."""
    return StatCache(ctx.settings.home / "cache" / "stat.sqlite")


# --- reads --------------------------------------------------------------------------------------


def list_datasets(ctx: Context, *, project: str) -> list[Dataset]:
    """Every dataset of ``project``, by name."""
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        pid = project_id(s, project, create=False)
        rows = s.execute(
            select(DatasetRow, _max_version())
            .where(DatasetRow.project_id == pid)
            .order_by(DatasetRow.name)
        ).all()
        return [_dataset(row, project, latest) for row, latest in rows]


def get_dataset(ctx: Context, *, project: str, name: str) -> Dataset:
    """One dataset, with its latest version number."""
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = _dataset_row(s, project, name)
        latest = s.scalar(
            select(func.max(DatasetVersionRow.version)).where(
                DatasetVersionRow.dataset_id == row.id, DatasetVersionRow.deleted_at.is_(None)
            )
        )
        return _dataset(row, project, latest)


def list_versions(
    ctx: Context, *, project: str, name: str, include_deleted: bool = False
) -> list[DatasetVersion]:
    """Every version of the dataset, oldest first, with its tags; soft-deleted ones only with
    ``include_deleted``."""
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = _dataset_row(s, project, name)
        query = select(DatasetVersionRow).where(DatasetVersionRow.dataset_id == row.id)
        if not include_deleted:
            query = query.where(DatasetVersionRow.deleted_at.is_(None))
        versions = list(s.scalars(query.order_by(DatasetVersionRow.version)))
        tags = _tags_of(s, row.id)
        return [_version(v, project, name, tags=tags.get(v.id, [])) for v in versions]


def get_version(
    ctx: Context, *, project: str, name: str, version: VersionRef = None
) -> DatasetVersion:
    """One version: ``None`` or ``"latest"`` for the newest, ``3``, ``"3"`` or ``"v3"``, or a
    tag (``data tag``). A soft-deleted version is a 404 that says how to restore it."""
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = _dataset_row(s, project, name)
        found = _resolve(s, row, project, version)
        if found.deleted_at is not None:
            reclaimed = not found.manifest_digest
            raise NotFoundError(
                f"version {found.version} of dataset {name!r} was deleted by {found.deleted_by} "
                + (
                    "and garbage-collected; it cannot be restored"
                    if reclaimed
                    else f"; restore it with `shipyard data restore {name}@{found.version}` "
                    "before `shipyard gc` reclaims it"
                ),
                field="version",
            )
        return _version(found, project, name, tags=_tags_of(s, row.id).get(found.id, []))


def list_files(
    ctx: Context, *, project: str, name: str, version: VersionRef = None
) -> list[FileEntry]:
    """The files of a version, sorted by path, read back from its (hash-verified) manifest."""
    found = get_version(ctx, project=project, name=name, version=version)
    return _read_manifest(ctx, found.manifest_digest)


def diff_versions(
    ctx: Context, *, project: str, name: str, a: VersionRef, b: VersionRef
) -> dict[str, list[str]]:
    """Paths ``added`` in ``b``, ``removed`` from ``a``, and ``modified`` (content changed)."""
    old = {f.path: f.digest for f in list_files(ctx, project=project, name=name, version=a)}
    new = {f.path: f.digest for f in list_files(ctx, project=project, name=name, version=b)}
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "modified": sorted(p for p in old.keys() & new.keys() if old[p] != new[p]),
    }


def table_changes(old: DatasetVersion, new: DatasetVersion) -> list[dict[str, Any]]:
    """For each table in both versions' profiles whose shape changed: its path, ``rows``
    (old, new), and columns ``added``, ``removed`` and ``retyped`` (``name: old -> new``)."""
    before = {t.path: t for t in old.profile.tables}
    changes: list[dict[str, Any]] = []
    for table in new.profile.tables:
        was = before.get(table.path)
        if was is None:
            continue
        old_types = {c.name: c.type for c in was.columns}
        new_types = {c.name: c.type for c in table.columns}
        change: dict[str, Any] = {
            "path": table.path,
            "rows": [was.rows, table.rows],
            "added": sorted(new_types.keys() - old_types.keys()),
            "removed": sorted(old_types.keys() - new_types.keys()),
            "retyped": sorted(
                f"{c}: {old_types[c]} -> {new_types[c]}"
                for c in old_types.keys() & new_types.keys()
                if old_types[c] != new_types[c]
            ),
        }
        if was.rows != table.rows or change["added"] or change["removed"] or change["retyped"]:
            changes.append(change)
    return changes


def status(
    ctx: Context, *, project: str, name: str, source: Path, version: VersionRef = None
) -> WorktreeStatus:
    """The folder ``source`` against a version (the latest by default): files added, modified
    and removed. Files the stat cache knows unchanged are not read (``data.worktree``)."""
    found = get_version(ctx, project=project, name=name, version=version)
    wanted = _manifest_columns(ctx, found.manifest_digest)
    return worktree.status_of(wanted, Path(source), cache=stat_cache(ctx))


def checkout(
    ctx: Context,
    *,
    project: str,
    name: str,
    version: VersionRef,
    dest: Path,
    progress: Progress | None = None,
    force: bool = False,
    link: LinkMode = "auto",
) -> Path:
    """Write the version's files under ``dest`` (created if needed) and return it.

    Incremental: a file already there with the version's content is left as it is (the stat
    cache says so without reading it); the others are written atomically from hash-verified
    blobs, linked as ``link`` says (``data.worktree.local_writer``), to paths confined to
    ``dest`` (a symlink already in ``dest`` that points out is refused before anything is
    written). A file to overwrite that holds local edits refuses the checkout (409, listing
    them) unless ``force``. Files of ``dest`` that the version does not list are left alone.
    """
    return checkout_version(
        ctx,
        project=project,
        name=name,
        version=version,
        dest=dest,
        progress=progress,
        force=force,
        link=link,
    ).dest


def checkout_version(
    ctx: Context,
    *,
    project: str,
    name: str,
    version: VersionRef,
    dest: Path,
    progress: Progress | None = None,
    force: bool = False,
    link: LinkMode = "auto",
) -> CheckoutResult:
    """:func:`checkout`, telling what it wrote and what it left."""
    files = list_files(ctx, project=project, name=name, version=version)
    return worktree.checkout(
        files,
        Path(dest),
        cache=stat_cache(ctx),
        write=worktree.local_writer(ctx.blobs, link=link),
        force=force,
        progress=progress,
    )


def read_table(
    ctx: Context, *, project: str, name: str, version: VersionRef, path: str
) -> pa.Table:
    """Load one Parquet or CSV file of a version as an Arrow table, from verified blob bytes."""
    validate_relative_path(path, field="path")
    if not _is_table(path):
        raise InvalidInputError(
            f"path {path!r} is not a table: only {', '.join(TABLE_SUFFIXES)} files can be read",
            field="path",
        )
    found = get_version(ctx, project=project, name=name, version=version)
    entry = next((f for f in _read_manifest(ctx, found.manifest_digest) if f.path == path), None)
    if entry is None:
        raise NotFoundError(
            f"dataset {name!r} v{found.version} has no file {path!r}; see list_files",
            field="path",
        )
    return _parse_table(path, ctx.blobs.get_bytes(entry.digest))


def manifest_digests(ctx: Context, manifest_digest: str) -> set[str]:
    """The digests a dataset manifest references: its files' and its own (for the collector)."""
    return {manifest_digest, *(f.digest for f in _read_manifest(ctx, manifest_digest))}


BACKFILL_MARK = "backfill:dataset-file-refs"


def backfill_file_refs(ctx: Context) -> int:
    """Give each project a blob reference to every file of its dataset versions; returns how many
    references were added. Stores made before blobs had owners recorded only the manifest, so a
    project's members could not read its older files through the API. Runs once per store (a
    mark in ``locks``); the server calls it at start. The manifests are read outside any
    transaction; a manifest that cannot be read is skipped and named in the log."""
    with ctx.db.read() as s:
        if s.get(LockRow, BACKFILL_MARK) is not None:
            return 0
        versions = s.execute(
            select(DatasetRow.project_id, DatasetVersionRow.manifest_digest).join(
                DatasetRow, DatasetRow.id == DatasetVersionRow.dataset_id
            )
        ).all()
    wanted: dict[str, set[str]] = {}
    for project_pk, manifest in versions:
        try:
            wanted.setdefault(project_pk, set()).update(manifest_digests(ctx, manifest))
        except (NotFoundError, OSError, pa.ArrowException) as exc:
            logger.warning(
                "dataset manifest %s could not be read for the backfill: %s", manifest, exc
            )
    added = 0
    with ctx.db.transaction() as s:
        lock(s, "datasets")
        if s.get(LockRow, BACKFILL_MARK) is not None:  # another process did it meanwhile
            return 0
        for project_pk, digests in wanted.items():
            added += add_refs(s, project_pk=project_pk, digests=digests)
        lock(s, BACKFILL_MARK, holder=f"added {added}")
    return added


# --- helpers: checking input --------------------------------------------------------------------


def _check_entries(
    ctx: Context, files: Sequence[FileEntry], *, trusted: dict[str, int]
) -> list[FileEntry]:
    """The entries sorted by path, once each is checked; a digest in ``trusted`` (digest ->
    size: the previous version's blobs) with the same size is not looked up in the store."""
    if not files:
        raise InvalidInputError("a dataset version needs at least one file", field="files")
    seen: set[str] = set()
    folders: set[str] = set()
    for i, entry in enumerate(files):
        field = f"files[{i}].path"
        check_path(entry.path, field=field)
        if entry.path in seen:
            raise InvalidInputError(f"{field} {entry.path!r} is listed twice", field=field)
        seen.add(entry.path)
        parts = entry.path.split("/")
        folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
    for i, entry in enumerate(files):
        field = f"files[{i}]"
        if entry.path in folders:
            raise InvalidInputError(
                f"{field}.path {entry.path!r} is both a file and a folder of other files",
                field=f"{field}.path",
            )
        try:
            check_digest(entry.digest)
        except InvalidInputError as exc:
            message = f"{field}.digest: {exc.message}"
            raise InvalidInputError(message, field=f"{field}.digest") from None
        if entry.size < 0:
            raise InvalidInputError(f"{field}.size must not be negative", field=f"{field}.size")
    _check_stored_many(ctx, files, trusted=trusted)
    return sorted(files, key=lambda e: e.path)


def _check_stored_many(
    ctx: Context, files: Sequence[FileEntry], *, trusted: dict[str, int]
) -> None:
    """``check_stored`` for every entry whose blob is not in ``trusted``, in one pass: each digest
    looked up once, and each file holding them touched once (the collector's grace period)."""
    todo = [(i, e) for i, e in enumerate(files) if trusted.get(e.digest) != e.size]
    stored = ctx.blobs.sizes([e.digest for _, e in todo])
    for i, entry in todo:
        if entry.digest not in stored or stored[entry.digest] != entry.size:
            # the one-by-one check names the field and the reason
            check_stored(
                ctx.blobs,
                digest=entry.digest,
                size=entry.size,
                path=entry.path,
                field=f"files[{i}]",
            )
    ctx.blobs.touch_many(list(stored))


def _verify_blobs(ctx: Context, files: Sequence[FileEntry], *, skip: frozenset[str]) -> None:
    """Re-hash each referenced blob not in ``skip``; refuse the commit (409) at a corrupted one,
    after moving it aside so that the next upload of the file stores it whole."""
    checked: set[str] = set(skip)
    for i, entry in enumerate(files):
        if entry.digest in checked:
            continue
        checked.add(entry.digest)
        if ctx.blobs.verify(entry.digest):
            continue
        moved = ctx.blobs.quarantine(entry.digest)
        then = (
            "it was moved aside: upload the file again (commit it again), then retry"
            if moved
            else "restore it from a backup or upload the file again, then retry"
        )
        raise ConflictError(
            f"files[{i}].digest: blob {entry.digest} ({entry.path!r}) is corrupted in the store "
            f"(its content no longer matches its hash); nothing was committed; {then}",
            field=f"files[{i}].digest",
            digest=entry.digest,
            path=entry.path,
        )


def _manifest_columns(ctx: Context, digest: str) -> dict[str, tuple[str, int]]:
    """A (hash-verified) manifest as ``path -> (digest, size)``, without an object per file."""
    table = pq.ParquetFile(pa.BufferReader(ctx.blobs.get_bytes(digest))).read()
    columns = table.select(MANIFEST_SCHEMA.names).to_pydict()
    pairs = zip(columns["digest"], columns["size"], strict=True)
    return dict(zip(columns["path"], pairs, strict=True))


def _read_manifest(ctx: Context, digest: str) -> list[FileEntry]:
    table = pq.ParquetFile(pa.BufferReader(ctx.blobs.get_bytes(digest))).read()
    columns = table.select(MANIFEST_SCHEMA.names).to_pydict()
    # our own manifest, hash-verified: its rows were validated when it was written
    trusted = FileEntry.trusted
    return [
        trusted(p, d, n)
        for p, d, n in zip(columns["path"], columns["digest"], columns["size"], strict=True)
    ]


def _parse_version(value: VersionRef) -> int | None:
    if value is None or value == "latest":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and (match := _VERSION_RE.fullmatch(value)) and int(match[1]) >= 1:
        return int(match[1])
    raise InvalidInputError(
        f"version {value!r} is not a version: use a number >= 1, 'v3' or 'latest'",
        field="version",
    )


# --- helpers: profile, validation, manifest -----------------------------------------------------


def _known_tables(
    base: DatasetVersion | None, base_files: list[FileEntry]
) -> dict[str, TableProfile]:
    if base is None:
        return {}
    digests = {f.path: f.digest for f in base_files}
    return {digests[t.path]: t for t in base.profile.tables if t.path in digests}


def _new_bytes(entries: Iterable[FileEntry], base_files: Iterable[FileEntry]) -> int:
    """Bytes of content this version adds over the previous one (each digest counted once)."""
    old = {f.digest for f in base_files}
    added = {e.digest: e.size for e in entries if e.digest not in old}
    return sum(added.values())


def _manifest_bytes(entries: list[FileEntry]) -> bytes:
    """The manifest as Parquet. Its columns are built from buffers, not with ``pa.array`` /
    ``pa.table``: those ask whether their input is a pandas object, which imports pandas (0.4-0.7
    s in a fresh process, on every commit)."""
    arrays = [
        _string_array([e.path for e in entries]),
        _string_array([e.digest for e in entries]),
        pa.Array.from_buffers(
            pa.int64(), len(entries), [None, pa.py_buffer(array("q", [e.size for e in entries]))]
        ),
    ]
    table = pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def _string_array(values: list[str]) -> pa.Array:
    """A string column (no nulls) from its values' UTF-8 bytes and their offsets."""
    encoded = [v.encode() for v in values]
    data = b"".join(encoded)
    if len(data) > _MAX_STRING_BYTES:
        raise InvalidInputError(
            f"the manifest's paths (or digests) take {len(data)} bytes, over the "
            f"{_MAX_STRING_BYTES} a column holds; commit the files as several datasets",
            field="files",
        )
    offsets = array("i", [0])
    offsets.extend(accumulate(len(item) for item in encoded))
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(data))


def _parse_table(path: str, data: bytes) -> pa.Table:
    if path.lower().endswith(".csv"):
        return pa_csv.read_csv(pa.BufferReader(data))
    return pq.ParquetFile(pa.BufferReader(data)).read()  # no pyarrow.dataset (nor pandas)


def _is_table(path: str) -> bool:
    return path.lower().endswith(TABLE_SUFFIXES)


# --- helpers: rows ------------------------------------------------------------------------------


def _insert_version(
    ctx: Context,
    *,
    project: str,
    name: str,
    base_id: str | None,
    manifest_digest: str,
    file_count: int,
    total_bytes: int,
    new_bytes: int,
    profile: DatasetProfile,
    validation: list[ValidationResult],
    message: str,
    digests: Iterable[str] = (),
) -> DatasetVersion | None:
    """Insert the next version, or return None when the latest is no longer ``base_id``."""
    with ctx.db.transaction() as s:
        lock(s, "datasets")
        pid = project_id(s, project, create=True)
        add_refs(s, project_pk=pid, digests=digests)
        dataset = s.scalar(
            select(DatasetRow).where(DatasetRow.project_id == pid, DatasetRow.name == name)
        )
        if dataset is None:
            dataset = DatasetRow(id=new_id(), project_id=pid, name=name, created_at=utcnow())
            s.add(dataset)
            s.flush()
        latest = s.scalar(
            select(DatasetVersionRow)
            .where(
                DatasetVersionRow.dataset_id == dataset.id, DatasetVersionRow.deleted_at.is_(None)
            )
            .order_by(DatasetVersionRow.version.desc())
            .limit(1)
        )
        if (latest.id if latest else None) != base_id:
            return None
        # numbers are never reused, not even those of deleted versions
        top = s.scalar(
            select(func.max(DatasetVersionRow.version)).where(
                DatasetVersionRow.dataset_id == dataset.id
            )
        )
        row = DatasetVersionRow(
            id=new_id(),
            dataset_id=dataset.id,
            version=(top or 0) + 1,
            manifest_digest=manifest_digest,
            file_count=file_count,
            total_bytes=total_bytes,
            new_bytes=new_bytes,
            profile=profile.model_dump(mode="json"),
            validation=[v.model_dump(mode="json") for v in validation],
            message=message,
            created_at=utcnow(),
            created_by=ctx.actor,
        )
        s.add(row)
        audit.record(
            s,
            actor=ctx.actor,
            action="dataset.commit",
            resource=f"project/{project}/dataset/{name}/version/{row.version}",
            details={
                "version_id": row.id,
                "manifest_digest": manifest_digest,
                "file_count": file_count,
                "total_bytes": total_bytes,
                "new_bytes": new_bytes,
            },
        )
        s.flush()
        return _version(row, project, name)


def _latest_version(ctx: Context, *, project: str, name: str) -> DatasetVersion | None:
    with ctx.db.read() as s:
        row = s.scalar(
            select(DatasetVersionRow)
            .join(DatasetRow, DatasetRow.id == DatasetVersionRow.dataset_id)
            .join(ProjectRow, ProjectRow.id == DatasetRow.project_id)
            .where(
                ProjectRow.name == project,
                DatasetRow.name == name,
                DatasetVersionRow.deleted_at.is_(None),
            )
            .order_by(DatasetVersionRow.version.desc())
            .limit(1)
        )
        return _version(row, project, name) if row is not None else None


def _dataset_row(s: Session, project: str, name: str) -> DatasetRow:
    pid = project_id(s, project, create=False)
    validate_name(name, field="name")
    row = s.scalar(select(DatasetRow).where(DatasetRow.project_id == pid, DatasetRow.name == name))
    if row is None:
        raise NotFoundError(
            f"dataset {name!r} does not exist in project {project!r}; commit it first",
            field="name",
        )
    return row


def _max_version() -> Any:
    return (
        select(func.max(DatasetVersionRow.version))
        .where(
            DatasetVersionRow.dataset_id == DatasetRow.id, DatasetVersionRow.deleted_at.is_(None)
        )
        .scalar_subquery()
    )


def _dataset(row: DatasetRow, project: str, latest: int | None) -> Dataset:
    return Dataset(
        id=row.id,
        project=project,
        name=row.name,
        created_at=aware(row.created_at) or utcnow(),
        latest_version=latest,
    )


def _version(
    row: DatasetVersionRow, project: str, name: str, *, tags: list[str] | None = None
) -> DatasetVersion:
    return DatasetVersion(
        id=row.id,
        project=project,
        dataset=name,
        version=row.version,
        manifest_digest=row.manifest_digest,
        file_count=row.file_count,
        total_bytes=row.total_bytes,
        new_bytes=row.new_bytes,
        profile=DatasetProfile.model_validate(row.profile),
        validation=[ValidationResult.model_validate(v) for v in row.validation],
        message=row.message,
        created_at=aware(row.created_at) or utcnow(),
        created_by=row.created_by,
        tags=sorted(tags or []),
        deleted_at=aware(row.deleted_at),
    )


# --- refs: numbers, tags; soft delete ------------------------------------------------------------

_RESERVED_TAGS = ("latest",)


def _resolve(s: Session, dataset: DatasetRow, project: str, ref: VersionRef) -> DatasetVersionRow:
    """The row ``ref`` names: ``None``/``latest`` the newest live one, a number, or a tag."""
    query = select(DatasetVersionRow).where(DatasetVersionRow.dataset_id == dataset.id)
    if isinstance(ref, str) and not _VERSION_RE.fullmatch(ref) and ref not in _RESERVED_TAGS:
        validate_name(ref, field="version")  # a tag
        found = s.scalar(
            query.join(DatasetTagRow, DatasetTagRow.version_id == DatasetVersionRow.id).where(
                DatasetTagRow.dataset_id == dataset.id, DatasetTagRow.tag == ref
            )
        )
        what = f"no version or tag {ref!r}"
    else:
        number = _parse_version(ref)
        if number is None:
            query = query.where(DatasetVersionRow.deleted_at.is_(None))
            found = s.scalar(query.order_by(DatasetVersionRow.version.desc()).limit(1))
            what = "no versions yet"
        else:
            found = s.scalar(query.where(DatasetVersionRow.version == number))
            what = f"no version {number}"
    if found is None:
        raise NotFoundError(
            f"dataset {dataset.name!r} in project {project!r} has {what}; list them with "
            f"`shipyard data versions {dataset.name}`",
            field="version",
        )
    return found


def _tags_of(s: Session, dataset_id: str) -> dict[str, list[str]]:
    """Each version id of the dataset with its tags."""
    tags: dict[str, list[str]] = {}
    for version_id, tag in s.execute(
        select(DatasetTagRow.version_id, DatasetTagRow.tag).where(
            DatasetTagRow.dataset_id == dataset_id
        )
    ):
        tags.setdefault(version_id, []).append(tag)
    return tags


def tag_version(
    ctx: Context, *, project: str, name: str, version: VersionRef, tag: str, force: bool = False
) -> DatasetVersion:
    """Name a version ``tag`` (then ``NAME@TAG`` reads it). A tag already on another version is
    moved only with ``force`` (a 409 says where it points otherwise)."""
    validate_name(tag, field="tag")
    if _VERSION_RE.fullmatch(tag) or tag in _RESERVED_TAGS:
        raise InvalidInputError(
            f"tag {tag!r} reads as a version reference; choose a name that is not a number, "
            "'vN' or 'latest'",
            field="tag",
        )
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.transaction() as s:
        dataset = _dataset_row(s, project, name)
        row = _resolve(s, dataset, project, version)
        if row.deleted_at is not None:
            raise ConflictError(
                f"version {row.version} of dataset {name!r} is deleted; restore it before "
                "tagging it",
                field="version",
            )
        held = s.get(DatasetTagRow, (dataset.id, tag))
        if held is not None and held.version_id != row.id:
            on = s.get(DatasetVersionRow, held.version_id)
            if not force:
                raise ConflictError(
                    f"tag {tag!r} of dataset {name!r} is on version "
                    f"{on.version if on else '?'}; move it with --force",
                    field="tag",
                )
            held.version_id, held.created_by, held.created_at = row.id, ctx.actor, utcnow()
        elif held is None:
            s.add(
                DatasetTagRow(
                    dataset_id=dataset.id,
                    tag=tag,
                    version_id=row.id,
                    created_at=utcnow(),
                    created_by=ctx.actor,
                )
            )
        audit.record(
            s,
            actor=ctx.actor,
            action="dataset.tag",
            resource=f"project/{project}/dataset/{name}/version/{row.version}",
            details={"tag": tag, "version_id": row.id},
        )
        s.flush()
        return _version(row, project, name, tags=_tags_of(s, dataset.id).get(row.id, []))


def untag(ctx: Context, *, project: str, name: str, tag: str) -> None:
    """Remove a tag (the version stays)."""
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.transaction() as s:
        dataset = _dataset_row(s, project, name)
        held = s.get(DatasetTagRow, (dataset.id, tag))
        if held is None:
            raise NotFoundError(f"dataset {name!r} has no tag {tag!r}", field="tag")
        s.delete(held)
        audit.record(
            s,
            actor=ctx.actor,
            action="dataset.untag",
            resource=f"project/{project}/dataset/{name}",
            details={"tag": tag, "version_id": held.version_id},
        )


def delete_version(ctx: Context, *, project: str, name: str, version: VersionRef) -> DatasetVersion:
    """Soft-delete a version: hidden from listings and reads (a 404 saying how to restore it),
    its number never reused; :func:`restore_version` undoes it until ``shipyard gc`` reclaims its
    files (those no other version, run, model or snapshot holds)."""
    if version is None or version == "latest":
        raise InvalidInputError(
            "name the version to delete (NAME@3 or NAME@TAG), not the latest", field="version"
        )
    return _set_deleted(ctx, project=project, name=name, version=version, deleted=True)


def restore_version(
    ctx: Context, *, project: str, name: str, version: VersionRef
) -> DatasetVersion:
    """Undo :func:`delete_version` (before ``shipyard gc`` reclaimed the version)."""
    return _set_deleted(ctx, project=project, name=name, version=version, deleted=False)


def _set_deleted(
    ctx: Context, *, project: str, name: str, version: VersionRef, deleted: bool
) -> DatasetVersion:
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.transaction() as s:
        lock(s, "datasets")  # against a commit choosing its base meanwhile
        dataset = _dataset_row(s, project, name)
        row = _resolve(s, dataset, project, version)
        if deleted and row.deleted_at is not None:
            raise ConflictError(f"version {row.version} of {name!r} is already deleted")
        if not deleted:
            if row.deleted_at is None:
                raise ConflictError(f"version {row.version} of {name!r} is not deleted")
            if not row.manifest_digest:
                raise NotFoundError(
                    f"version {row.version} of {name!r} was garbage-collected; it cannot be "
                    "restored",
                    field="version",
                )
        row.deleted_at = utcnow() if deleted else None
        row.deleted_by = ctx.actor if deleted else None
        audit.record(
            s,
            actor=ctx.actor,
            action="dataset.delete" if deleted else "dataset.restore",
            resource=f"project/{project}/dataset/{name}/version/{row.version}",
            details={"version_id": row.id, "manifest_digest": row.manifest_digest},
        )
        s.flush()
        return _version(row, project, name, tags=_tags_of(s, dataset.id).get(row.id, []))


def reclaim_deleted(ctx: Context, *, older_than: float | None = None) -> int:
    """For ``shipyard gc``: versions soft-deleted before ``older_than`` (a Unix time; all when
    None) let go of their manifest (kept as a tombstone so their number is never reused) and
    their tags, so the collector can sweep files only they held. How many were reclaimed."""
    with ctx.db.transaction() as s:
        query = select(DatasetVersionRow).where(
            DatasetVersionRow.deleted_at.is_not(None), DatasetVersionRow.manifest_digest != ""
        )
        reclaimed = 0
        for row in s.scalars(query):
            when = aware(row.deleted_at)
            if older_than is not None and when is not None and when.timestamp() > older_than:
                continue
            s.execute(sa_delete(DatasetTagRow).where(DatasetTagRow.version_id == row.id))
            row.manifest_digest = ""
            reclaimed += 1
        return reclaimed


def deleted_versions(ctx: Context) -> int:
    """How many soft-deleted versions ``shipyard gc`` would reclaim now."""
    with ctx.db.read() as s:
        return int(
            s.scalar(
                select(func.count()).where(
                    DatasetVersionRow.deleted_at.is_not(None),
                    DatasetVersionRow.manifest_digest != "",
                )
            )
            or 0
        )


def select_files(files: Sequence[FileEntry], include: Sequence[str]) -> list[FileEntry]:
    """The entries matching any of ``include`` (gitignore-style globs: ``images/**``,
    ``*.parquet``); all of them when ``include`` is empty. A pattern matching nothing is an
    error naming it (a typo would otherwise pull nothing, silently)."""
    if not include:
        return list(files)
    import pathspec

    chosen: list[FileEntry] = []
    for pattern in include:
        if not pattern or pattern.startswith("!"):
            raise InvalidInputError(
                f"--include {pattern!r}: give a glob of the files to take", field="include"
            )
    specs = [(p, pathspec.GitIgnoreSpec.from_lines([p])) for p in include]
    matched: set[str] = set()
    for entry in files:
        hits = [p for p, spec in specs if spec.match_file(entry.path)]
        if hits:
            chosen.append(entry)
            matched.update(hits)
    unmatched = [p for p in include if p not in matched]
    if unmatched:
        raise NotFoundError(
            f"--include {', '.join(map(repr, unmatched))} matches no file of the version; "
            "see its files with `shipyard data show NAME@VERSION`",
            field="include",
        )
    return chosen
