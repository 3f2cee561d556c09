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
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shipyard.blobs.store import check_digest, check_stored
from shipyard.context import Context, new_id
from shipyard.domain.models import (
    ColumnProfile,
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
from shipyard.security.paths import safe_file, safe_join, walk_files
from shipyard.security.rbac import authorize
from shipyard.store.engine import lock
from shipyard.store.queries import project_id
from shipyard.store.tables import (
    DatasetRow,
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
PROFILE_MAX_BYTES = 512 * 1024 * 1024
"""Tables larger than this are not loaded for profiling (it would need their whole content in
memory); the skip is recorded as a failed validation check rather than silently."""

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("digest", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
    ]
)

_COMMIT_ATTEMPTS = 5
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
) -> DatasetVersion:
    validate_name(project, field="project")
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.EDITOR)
    entries = _check_entries(ctx, files)
    total = sum(e.size for e in entries)

    base = _latest_version(ctx, project=project, name=name)
    base_files = _read_manifest(ctx, base.manifest_digest) if base else []
    if base is not None and base_files == entries:
        return base
    known = {f.digest for f in base_files}
    require_refs(
        ctx, project=project, digests={e.digest for e in entries} - known, field="files.digest"
    )
    _verify_blobs(ctx, files, skip=verified | {f.digest for f in base_files})
    profile, validation = _profile(
        ctx, entries, known=_known_tables(base, base_files), progress=progress
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
            digests=[manifest_digest, *(e.digest for e in entries)],
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
) -> DatasetVersion:
    """Put every file under ``source`` into the blob store and commit them as the next version.

    A single file is committed under its base name. Files are streamed into the store (identical
    content is stored once); ``progress`` reports that upload. Every path is checked before the
    first byte is stored, so a symlink that points out of ``source`` (or, for a single file, out
    of its folder), a hard link, or an unsafe file name (an :class:`UnsafePathError` naming it)
    leaves the store untouched.
    """
    validate_name(project, field="project")
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.EDITOR)
    found = source_files(Path(source))
    total = sum(real.stat().st_size for _, real in found)
    done = 0
    entries: list[FileEntry] = []
    for rel, real in found:
        put = ctx.blobs.put_file(real)  # hashes what it stores, and re-hashes what was there
        entries.append(FileEntry(path=rel, digest=put.digest, size=put.size))
        done += put.size
        if progress is not None:
            progress(done, max(total, done), rel)
    return _commit(
        ctx,
        project=project,
        name=name,
        files=entries,
        message=message,
        progress=None,
        verified=frozenset(e.digest for e in entries),
    )


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
                DatasetVersionRow.dataset_id == row.id
            )
        )
        return _dataset(row, project, latest)


def list_versions(ctx: Context, *, project: str, name: str) -> list[DatasetVersion]:
    """Every version of the dataset, oldest first."""
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = _dataset_row(s, project, name)
        versions = s.scalars(
            select(DatasetVersionRow)
            .where(DatasetVersionRow.dataset_id == row.id)
            .order_by(DatasetVersionRow.version)
        )
        return [_version(v, project, name) for v in versions]


def get_version(
    ctx: Context, *, project: str, name: str, version: VersionRef = None
) -> DatasetVersion:
    """One version: ``None`` or ``"latest"`` for the newest, else ``3``, ``"3"`` or ``"v3"``."""
    number = _parse_version(version)
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = _dataset_row(s, project, name)
        query = select(DatasetVersionRow).where(DatasetVersionRow.dataset_id == row.id)
        if number is None:
            query = query.order_by(DatasetVersionRow.version.desc()).limit(1)
        else:
            query = query.where(DatasetVersionRow.version == number)
        found = s.scalar(query)
        if found is None:
            what = "no versions yet" if number is None else f"no version {number}"
            raise NotFoundError(
                f"dataset {name!r} in project {project!r} has {what}; list them with list_versions",
                field="version",
            )
        return _version(found, project, name)


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


def checkout(
    ctx: Context,
    *,
    project: str,
    name: str,
    version: VersionRef,
    dest: Path,
    progress: Progress | None = None,
) -> Path:
    """Write the version's files under ``dest`` (created if needed) and return it.

    Each file is written atomically from a hash-verified blob, to a path confined to ``dest``
    (a symlink already in ``dest`` that points out is refused before anything is written). Files
    of ``dest`` that the version does not list are left alone.
    """
    files = list_files(ctx, project=project, name=name, version=version)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    targets = [(entry, safe_join(dest, entry.path)) for entry in files]
    total = sum(f.size for f in files)
    done = 0
    for entry, target in targets:
        ctx.blobs.copy_to(entry.digest, target)
        done += entry.size
        if progress is not None:
            progress(done, total, entry.path)
    return dest


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


def _check_entries(ctx: Context, files: Sequence[FileEntry]) -> list[FileEntry]:
    if not files:
        raise InvalidInputError("a dataset version needs at least one file", field="files")
    seen: set[str] = set()
    folders: set[str] = set()
    for i, entry in enumerate(files):
        field = f"files[{i}].path"
        validate_relative_path(entry.path, field=field)
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
        check_stored(ctx.blobs, digest=entry.digest, size=entry.size, path=entry.path, field=field)
    return sorted(files, key=lambda e: e.path)


def source_files(source: Path) -> list[tuple[str, Path]]:
    """The files a commit of ``source`` takes, as ``(relative path, real path)``, all checked.

    Shared by the embedded commit and the HTTP client, so both refuse the same sources alike.
    """
    if not source.exists():
        raise NotFoundError(f"source {str(source)!r} does not exist", field="source")
    if source.is_file():
        validate_relative_path(source.name, field="source")
        return [(source.name, safe_file(source, field="source"))]
    found = list(walk_files(source, field="source"))
    if not found:
        raise InvalidInputError(f"source {str(source)!r} contains no files", field="source")
    return found


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


def _read_manifest(ctx: Context, digest: str) -> list[FileEntry]:
    table = pq.read_table(pa.BufferReader(ctx.blobs.get_bytes(digest)))
    return [FileEntry(**row) for row in table.select(MANIFEST_SCHEMA.names).to_pylist()]


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


@dataclass(frozen=True)
class _TableResult:
    profile: TableProfile | None
    error: str | None = None


def _profile(
    ctx: Context,
    entries: list[FileEntry],
    *,
    known: dict[str, TableProfile],
    progress: Progress | None,
) -> tuple[DatasetProfile, list[ValidationResult]]:
    """Profile every table (content already profiled - by digest - is reused) and validate it."""
    total = sum(e.size for e in entries)
    done = 0
    tables: list[TableProfile] = []
    validation: list[ValidationResult] = []
    cache: dict[str, _TableResult] = {d: _TableResult(p) for d, p in known.items()}
    for entry in entries:
        if _is_table(entry.path):
            result = cache.get(entry.digest)
            if result is None:
                result = cache[entry.digest] = _profile_table(ctx, entry)
            profile = result.profile
            if profile is not None:
                profile = profile.model_copy(update={"path": entry.path})
                tables.append(profile)
            validation.extend(_validate_table(entry.path, profile, result.error))
        done += entry.size
        if progress is not None:
            progress(done, total, entry.path)
    return DatasetProfile(files=len(entries), bytes=total, tables=tables), validation


def _profile_table(ctx: Context, entry: FileEntry) -> _TableResult:
    if entry.size > PROFILE_MAX_BYTES:
        return _TableResult(None, f"larger than {PROFILE_MAX_BYTES} bytes; not profiled")
    try:
        table = _parse_table(entry.path, ctx.blobs.get_bytes(entry.digest))
    except (pa.ArrowException, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return _TableResult(None, f"cannot be read as a table: {reason}")
    columns = [_column_profile(n, table.column(n)) for n in table.column_names]
    return _TableResult(TableProfile(path=entry.path, rows=table.num_rows, columns=columns))


def _column_profile(name: str, column: pa.ChunkedArray) -> ColumnProfile:
    """Type, non-null ``count`` and ``nulls``; min/max/mean/std (population, NaN ignored) for
    numbers; ``distinct`` for strings."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
        column = column.cast(kind)
    nulls = column.null_count
    stats: dict[str, Any] = {}
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = column
        if pa.types.is_floating(kind):
            values = pc.filter(column, pc.invert(pc.is_nan(column)))
        if len(values) - values.null_count > 0:
            try:
                bounds = pc.min_max(values)
                stats = {
                    "min": _finite(bounds["min"].as_py()),
                    "max": _finite(bounds["max"].as_py()),
                    "mean": _finite(pc.mean(values).as_py()),
                    "std": _finite(pc.stddev(values, ddof=0).as_py()),
                }
            except pa.ArrowNotImplementedError:
                stats = {}
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        stats = {"distinct": pc.count_distinct(column, mode="only_valid").as_py()}
    return ColumnProfile(name=name, type=str(kind), count=len(column) - nulls, nulls=nulls, **stats)


def _validate_table(
    path: str, profile: TableProfile | None, error: str | None
) -> list[ValidationResult]:
    if profile is None:
        return [ValidationResult(check=f"readable:{path}", passed=False, message=error or "")]
    all_null = [c.name for c in profile.columns if profile.rows and c.nulls == profile.rows]
    return [
        ValidationResult(
            check=f"readable:{path}",
            passed=True,
            message=f"{profile.rows} rows, {len(profile.columns)} columns",
        ),
        ValidationResult(
            check=f"non_empty:{path}",
            passed=profile.rows > 0,
            message=f"{profile.rows} rows" if profile.rows else "the table has no rows",
        ),
        ValidationResult(
            check=f"no_all_null_columns:{path}",
            passed=not all_null,
            message=f"columns with only nulls: {', '.join(all_null)}"
            if all_null
            else "every column has values",
        ),
    ]


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
    table = pa.Table.from_pylist([e.model_dump() for e in entries], schema=MANIFEST_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def _parse_table(path: str, data: bytes) -> pa.Table:
    if path.lower().endswith(".csv"):
        return pa_csv.read_csv(pa.BufferReader(data))
    return pq.read_table(pa.BufferReader(data))


def _is_table(path: str) -> bool:
    return path.lower().endswith(TABLE_SUFFIXES)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


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
            .where(DatasetVersionRow.dataset_id == dataset.id)
            .order_by(DatasetVersionRow.version.desc())
            .limit(1)
        )
        if (latest.id if latest else None) != base_id:
            return None
        row = DatasetVersionRow(
            id=new_id(),
            dataset_id=dataset.id,
            version=(latest.version if latest else 0) + 1,
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
            .where(ProjectRow.name == project, DatasetRow.name == name)
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
        .where(DatasetVersionRow.dataset_id == DatasetRow.id)
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


def _version(row: DatasetVersionRow, project: str, name: str) -> DatasetVersion:
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
    )
