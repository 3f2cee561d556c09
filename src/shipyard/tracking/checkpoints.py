"""Checkpoints of a run: what a preempted or restarted attempt of a job resumes from.

A checkpoint is a file or a folder, stored content-addressed: its files are blobs (uploaded
first, as for datasets and artifacts), and the checkpoint records them - path, digest, size -
with the training ``step`` it was taken at, the ``attempt`` of the job that took it, and a
``number`` (1, 2, ... per run). Its ``digest`` is the blob of its manifest (the sorted file list
as canonical JSON), so two checkpoints of the same content have the same digest.

Checkpoints have their own tables rather than being run artifacts under a reserved prefix: a run
saves many of them (every few minutes of a long job), each with a step and an attempt, and they
would crowd the run's artifact list, which is what a model version's lineage names; artifacts
are also one blob each, and a folder checkpoint is many. One row per file (each with a
``digest`` column) lets the garbage collector keep every blob a checkpoint holds without
reading manifests, and the project references them (``blob_refs``), so the job that saved them,
and its project's viewers, may read them back.

Only a running run takes checkpoints (a crashed one is revived, as by a heartbeat). The writer
is the run's editor - a job's token may write to its own run only (``security.rbac``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shipyard.blobs.store import check_digest, check_stored
from shipyard.context import Context, new_id
from shipyard.domain.checkpoints import Checkpoint, CheckpointKind
from shipyard.domain.metrics import step_problem
from shipyard.domain.models import FileEntry
from shipyard.domain.names import validate_relative_path
from shipyard.domain.principals import Role
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError
from shipyard.security import audit
from shipyard.security.blobrefs import add_refs, require_refs
from shipyard.security.paths import safe_file, walk_files
from shipyard.store.tables import CheckpointFileRow, CheckpointRow, RunRow, aware, utcnow
from shipyard.tracking.runs import OPEN_STATUSES, _project_name, _require_for, _require_open

MAX_ATTEMPT = 2**31 - 1
MAX_FILES = 1_000_000


def record_checkpoint(
    ctx: Context,
    *,
    run_id: str,
    files: Sequence[FileEntry],
    kind: CheckpointKind | str = CheckpointKind.FOLDER,
    step: int | None = None,
    attempt: int = 1,
    project: str | None = None,
) -> Checkpoint:
    """Record stored blobs as the run's next checkpoint and return it.

    ``files``: the checkpoint's files (for ``kind="file"`` exactly one, named by its file name);
    every blob must be stored and referenced by the run's project. Nothing is recorded when one
    input is refused.
    """
    kind = _parse_kind(kind)
    if step is not None and (problem := step_problem(step)) is not None:
        raise InvalidInputError(f"{problem}; give the training step, or none", field="step")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= MAX_ATTEMPT:
        raise InvalidInputError(
            f"attempt {attempt!r} must be a whole number from 1 to {MAX_ATTEMPT}", field="attempt"
        )
    entries = _check_files(files, kind=kind)
    with ctx.db.read() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
        _require_takes(row)
        owner = _project_name(s, row.project_id)
    digests = {e.digest for e in entries}
    require_refs(ctx, project=owner, digests=digests, field="files")
    for i, entry in enumerate(entries):
        check_stored(
            ctx.blobs, digest=entry.digest, size=entry.size, path=entry.path, field=f"files[{i}]"
        )
    manifest = ctx.blobs.put_bytes(_manifest_bytes(kind, entries)).digest
    with ctx.db.transaction() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.EDITOR)
        _require_open(s, row, doing="takes checkpoints")
        last = s.scalar(
            select(func.max(CheckpointRow.number)).where(CheckpointRow.run_id == run_id)
        )
        checkpoint = CheckpointRow(
            id=new_id(),
            run_id=run_id,
            number=(last or 0) + 1,
            kind=kind.value,
            digest=manifest,
            size=sum(e.size for e in entries),
            step=step,
            attempt=attempt,
            created_at=utcnow(),
        )
        s.add(checkpoint)
        s.flush()
        s.add_all(
            CheckpointFileRow(
                checkpoint_id=checkpoint.id, path=e.path, digest=e.digest, size=e.size
            )
            for e in entries
        )
        add_refs(s, project_pk=row.project_id, digests=[manifest, *digests])
        row.heartbeat_at = utcnow()  # saving a checkpoint is a sign of life
        audit.record(
            s,
            actor=ctx.actor,
            action="run.checkpoint",
            resource=f"project/{owner}/run/{run_id}",
            details={
                "number": checkpoint.number,
                "digest": manifest,
                "step": step,
                "attempt": attempt,
                "files": len(entries),
            },
        )
        return _to_domain(checkpoint, owner, entries)


def list_checkpoints(ctx: Context, *, run_id: str, project: str | None = None) -> list[Checkpoint]:
    """The run's checkpoints, oldest first, each with its files."""
    with ctx.db.read() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.VIEWER)
        owner = _project_name(s, row.project_id)
        rows = list(
            s.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.run_id == run_id)
                .order_by(CheckpointRow.number)
            )
        )
        files = _files(s, [r.id for r in rows])
        return [_to_domain(r, owner, files.get(r.id, [])) for r in rows]


def latest_checkpoint(
    ctx: Context, *, run_id: str, project: str | None = None
) -> Checkpoint | None:
    """The run's newest checkpoint (the highest number), or None when it has none."""
    with ctx.db.read() as s:
        row = _require_for(ctx, s, run_id, project=project, need=Role.VIEWER)
        owner = _project_name(s, row.project_id)
        newest = s.scalar(
            select(CheckpointRow)
            .where(CheckpointRow.run_id == run_id)
            .order_by(CheckpointRow.number.desc())
            .limit(1)
        )
        if newest is None:
            return None
        return _to_domain(newest, owner, _files(s, [newest.id]).get(newest.id, []))


def checkpoint_sources(path: Path) -> tuple[CheckpointKind, list[tuple[str, Path]]]:
    """What a checkpoint of local ``path`` takes: a file, or a folder's files as ``(relative
    path, real path)``, sorted; symlinks pointing out and hard links refused (``UnsafePathError``
    naming them). Shared by the embedded and the HTTP backend so both refuse alike."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{str(path)!r} does not exist; nothing to checkpoint", field="path")
    if path.is_file():
        validate_relative_path(path.name, field="path")
        return CheckpointKind.FILE, [(path.name, safe_file(path, field="path"))]
    if not path.is_dir():
        raise InvalidInputError(f"{str(path)!r} is neither a file nor a folder", field="path")
    found = list(walk_files(path, field="path"))
    if not found:
        raise InvalidInputError(
            f"folder {str(path)!r} contains no files; nothing to checkpoint", field="path"
        )
    return CheckpointKind.FOLDER, found


# --- helpers ------------------------------------------------------------------------------------


def _parse_kind(kind: CheckpointKind | str) -> CheckpointKind:
    try:
        return CheckpointKind(kind)
    except ValueError:
        raise InvalidInputError(f"kind {kind!r} is not one of file, folder", field="kind") from None


def _check_files(files: Sequence[FileEntry], *, kind: CheckpointKind) -> list[FileEntry]:
    if not files:
        raise InvalidInputError(
            "a checkpoint needs at least one file (the folder is empty?); write the state to "
            "save into it first",
            field="files",
        )
    if len(files) > MAX_FILES:
        raise InvalidInputError(
            f"a checkpoint holds at most {MAX_FILES} files, got {len(files)}", field="files"
        )
    if kind is CheckpointKind.FILE and len(files) != 1:
        raise InvalidInputError(
            f"a file checkpoint holds exactly one file, got {len(files)}; use kind 'folder'",
            field="files",
        )
    seen: set[str] = set()
    folders: set[str] = set()
    for i, entry in enumerate(files):
        field = f"files[{i}].path"
        validate_relative_path(entry.path, field=field)
        if kind is CheckpointKind.FILE and "/" in entry.path:
            raise InvalidInputError(
                f"{field} {entry.path!r}: a file checkpoint is named by its file name alone",
                field=field,
            )
        if entry.path in seen:
            raise InvalidInputError(f"{field} {entry.path!r} is listed twice", field=field)
        seen.add(entry.path)
        parts = entry.path.split("/")
        folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
        try:
            check_digest(entry.digest)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"files[{i}].digest: {exc.message}", field=f"files[{i}].digest"
            ) from None
        if isinstance(entry.size, bool) or not isinstance(entry.size, int) or entry.size < 0:
            raise InvalidInputError(
                f"files[{i}].size must be a whole number of bytes, not negative",
                field=f"files[{i}].size",
            )
    for i, entry in enumerate(files):
        if entry.path in folders:
            raise InvalidInputError(
                f"files[{i}].path {entry.path!r} is both a file and a folder of other files",
                field=f"files[{i}].path",
            )
    return sorted(files, key=lambda e: e.path)


def _require_takes(row: RunRow) -> None:
    if row.status not in OPEN_STATUSES:
        raise InvalidStateError(
            f"run {row.id} is {row.status}; only a running run takes checkpoints (a job's "
            "attempts share their run while it runs; start a new run to save more)",
            field="run_id",
        )


def _manifest_bytes(kind: CheckpointKind, entries: list[FileEntry]) -> bytes:
    body = {
        "kind": kind.value,
        "files": [{"path": e.path, "digest": e.digest, "size": e.size} for e in entries],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _files(s: Session, ids: list[str]) -> dict[str, list[FileEntry]]:
    out: dict[str, list[FileEntry]] = {}
    if not ids:
        return out
    rows = s.execute(
        select(
            CheckpointFileRow.checkpoint_id,
            CheckpointFileRow.path,
            CheckpointFileRow.digest,
            CheckpointFileRow.size,
        )
        .where(CheckpointFileRow.checkpoint_id.in_(ids))
        .order_by(CheckpointFileRow.path)
    )
    for checkpoint_id, path, digest, size in rows:
        out.setdefault(checkpoint_id, []).append(FileEntry(path=path, digest=digest, size=size))
    return out


def _to_domain(row: CheckpointRow, project: str, files: list[FileEntry]) -> Checkpoint:
    return Checkpoint(
        id=row.id,
        run_id=row.run_id,
        project=project,
        number=row.number,
        kind=CheckpointKind(row.kind),
        digest=row.digest,
        size=row.size,
        step=row.step,
        attempt=row.attempt,
        created_at=aware(row.created_at) or utcnow(),
        files=files,
    )
