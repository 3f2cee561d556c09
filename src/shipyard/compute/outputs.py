"""A job's declared outputs become artifacts of its run; what else it wrote is accounted for.

A job runs in a folder of its own (its code snapshot unpacked, or an empty work folder). When it
ends, its executor calls :func:`collect_outputs` with the paths the job declared
(``JobSpec.outputs``, ``shipyard run --output model.pt``): each one - a file, or a folder and
everything in it - is stored in the blob store and recorded as an artifact of the job's run under
the same relative path. The files are read from the folder with the same confinement as any user
folder (``security.paths``): a path that resolves outside it through a link, or a hard link, is
refused rather than read. Declared paths that do not exist are listed as missing.

Where a job ran decides how the files travel, never what is checked: :func:`plan_outputs` says
what to store from the folder alone, :func:`store_outputs` stores it through a callback. The
local executor's supervisor stores straight into the blob store (:func:`collect_outputs`); a Ray
worker, on a node that has neither our database nor our blob store, uploads over the server's
REST API with the job's own token (:func:`upload_outputs`), which may write artifacts of the
job's run - and, like the executor, add ones the run does not hold yet after it ended.

Everything else the job wrote there (files that were neither in its code snapshot nor declared)
is listed too, with where it is left: in the job's folder (``kept_in``), or nowhere when that
folder is removed after the job (a server's job-user sandbox), so the user learns about an
output that was lost and how to keep it next time. ``OutputsReport.lines()`` are the
"shipyard: ..." notes the executor appends to the job's log.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from shipyard.compute.snapshot import SKIP_DIRS, SKIP_SUFFIXES, list_code
from shipyard.context import Context
from shipyard.domain.names import validate_relative_path
from shipyard.errors import ShipyardError, UnsafePathError
from shipyard.security.blobrefs import note_upload
from shipyard.security.paths import check_not_hard_link, safe_join, walk_files
from shipyard.store.tables import JobRow
from shipyard.tracking import runs

# At most this many of the other files are named (the report says how many there were).
MAX_LISTED = 20
# The scan for other files stops after this many entries (the count then says "at least").
MAX_SCANNED = 100_000
# How long ``upload_outputs`` waits for the server's ``/healthz`` before it gives up on it.
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputsReport:
    stored: list[str]  # artifact paths recorded on the run (a folder's files one by one)
    missing: list[str]  # declared paths the job did not write
    others: list[str]  # files written outside the declared outputs (the first MAX_LISTED)
    kept_in: str | None  # the folder they stay in; None when it is removed after the job
    others_total: int = 0  # how many such files there were (at least, past MAX_SCANNED)
    problems: list[str] = field(default_factory=list)  # "PATH: why it was not stored"
    run_id: str | None = None
    stored_bytes: int = 0

    def lines(self) -> list[str]:
        """One "shipyard: ..." line per fact, for the job's log."""
        out: list[str] = []
        if self.stored:
            shown = _names(self.stored)
            out.append(
                f"shipyard: stored {_count(len(self.stored), 'declared output file')} "
                f"({_size(self.stored_bytes)}) as artifacts of run {self.run_id}: {shown}"
            )
        out.extend(
            f"shipyard: declared output {path!r} was not found in the job's folder; nothing "
            "was stored for it"
            for path in self.missing
        )
        out.extend(f"shipyard: declared output not stored: {problem}" for problem in self.problems)
        if self.others_total:
            what = _count(self.others_total, "file")
            shown = _names(self.others, total=self.others_total)
            if self.kept_in is not None:
                out.append(
                    f"shipyard: {what} the job wrote outside its declared outputs stay in "
                    f"{self.kept_in}: {shown}; declare them (--output PATH) to store them as "
                    "artifacts of the run"
                )
            else:
                out.append(
                    f"shipyard: {what} the job wrote outside its declared outputs were "
                    f"discarded with its folder: {shown}; declare them (--output PATH) to keep "
                    "them as artifacts of the run"
                )
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputsPlan:
    """What of a job's declared outputs is to be stored, decided from its folder alone.

    Pure (no store, no database): the local executor stores ``files`` in the blob store, a Ray
    worker uploads them to the server, and both get the same checks and the same notes."""

    files: list[tuple[str, Path]]  # (artifact path, the real file to read), in declared order
    missing: list[str]
    problems: list[str]
    others: list[str]
    others_total: int
    kept_in: str | None


# Stores one file (its real path) as artifact ``name`` of the job's run; returns its size.
StoreFile = Callable[[str, Path], int]


def plan_outputs(
    workdir: Path,
    declared: list[str],
    *,
    code_files: Collection[str],
    run_id: str | None,
    discarded: bool = False,
) -> OutputsPlan:
    """The files of the ``declared`` outputs found in ``workdir`` that may be stored (a path that
    escapes ``workdir`` through a link, or a hard link, is a problem, not a file), the missing
    ones, and the other files the job wrote (``code_files`` are its snapshot's)."""
    root = Path(workdir)
    files: list[tuple[str, Path]] = []
    missing: list[str] = []
    problems: list[str] = []
    for path in declared:
        try:
            found = _declared_files(root, path)
        except (ShipyardError, OSError) as exc:
            problems.append(f"{path}: {_reason(exc)}")
            continue
        if found is None:
            missing.append(path)
        elif not found:
            problems.append(f"{path}: the folder is empty")
        elif run_id is None:
            problems.append(f"{path}: the job has no run to store it in")
        else:
            files.extend(found)
    listed, total = _other_files(root, set(code_files), declared)
    return OutputsPlan(
        files=files,
        missing=missing,
        problems=problems,
        others=listed,
        others_total=total,
        kept_in=None if discarded else str(root),
    )


def store_outputs(plan: OutputsPlan, store: StoreFile, *, run_id: str | None) -> OutputsReport:
    """Store each file of ``plan`` with ``store``; one that fails (unreadable, the run refuses
    it) is reported in ``problems`` and does not keep the others from being stored."""
    stored: list[str] = []
    problems = list(plan.problems)
    stored_bytes = 0
    for name, real in plan.files:
        try:
            size = store(name, real)
        except (ShipyardError, OSError) as exc:
            problems.append(f"{name}: {_reason(exc)}")
            continue
        stored.append(name)
        stored_bytes += size
    return OutputsReport(
        stored=stored,
        missing=list(plan.missing),
        others=list(plan.others),
        kept_in=plan.kept_in,
        others_total=plan.others_total,
        problems=problems,
        run_id=run_id,
        stored_bytes=stored_bytes,
    )


def collect_outputs(
    ctx: Context,
    *,
    job_id: str,
    project: str,
    run_id: str | None,
    workdir: Path,
    declared: list[str],
    code_files: Collection[str] | None = None,
    discarded: bool = False,
) -> OutputsReport:
    """Store the ``declared`` outputs found in ``workdir`` as artifacts of run ``run_id``.

    ``code_files`` are the files of the job's code snapshot (read from the job's stored snapshot
    when None); ``discarded`` says ``workdir`` is removed once the job is over. One declared
    output that cannot be stored (unsafe, unreadable, the run refuses it) is reported in
    ``problems`` and does not keep the others from being stored.
    """
    if code_files is None:
        code_files = _snapshot_files(ctx, job_id)
    plan = plan_outputs(
        workdir, declared, code_files=code_files, run_id=run_id, discarded=discarded
    )

    def store(name: str, real: Path) -> int:
        assert run_id is not None  # a plan holds files only for a job with a run
        put = ctx.blobs.put_file(real)
        note_upload(ctx, project=project, digest=put.digest)
        runs.log_artifact(
            ctx,
            run_id=run_id,
            path=name,
            digest=put.digest,
            size=put.size,
            project=project,
            after_end=True,
        )
        return put.size

    return store_outputs(plan, store, run_id=run_id)


def upload_outputs(
    *,
    server_url: str,
    token: str | None,
    project: str,
    run_id: str | None,
    workdir: Path,
    declared: list[str],
    code_files: Collection[str],
    discarded: bool = True,
    transport: httpx.BaseTransport | None = None,
) -> OutputsReport:
    """:func:`collect_outputs` for a job that ran where our store is not (a Ray node): the files
    go to the server at ``server_url`` over its REST API with the job's own ``token``, which may
    write artifacts of its run. When the server cannot be reached, one problem says so and
    nothing is sent. ``transport``: an in-process app (tests)."""
    from shipyard.client.http import HttpBackend  # the SDK: only where a job's node uploads

    plan = plan_outputs(
        workdir, declared, code_files=code_files, run_id=run_id, discarded=discarded
    )
    if not plan.files:
        return store_outputs(plan, _never, run_id=run_id)
    unreachable = _unreachable(server_url, transport)
    if unreachable is not None:
        names = _names([name for name, _ in plan.files])
        failed = replace(plan, files=[], problems=[*plan.problems, f"{names}: {unreachable}"])
        return store_outputs(failed, _never, run_id=run_id)
    backend = HttpBackend(server_url, token=token, project=project, transport=transport)

    def store(name: str, real: Path) -> int:
        assert run_id is not None  # a plan holds files only for a job with a run
        return backend.log_artifact(run_id, path=name, local_file=real, after_end=True).size

    try:
        return store_outputs(plan, store, run_id=run_id)
    finally:
        backend.close()


# --- helpers ---------------------------------------------------------------------------------


def _declared_files(root: Path, path: str) -> list[tuple[str, Path]] | None:
    """``(artifact path, real path)`` of the files of one declared output; None if absent."""
    validate_relative_path(path, field="outputs")
    if not os.path.lexists(root / path):
        return None
    real = safe_join(root, path, field="outputs")  # a link that points out raises here
    if real.is_dir():
        return [(f"{path}/{rel}", file) for rel, file in walk_files(real, field="outputs")]
    if not real.is_file():
        if not real.exists():  # a dangling link inside the folder
            return None
        raise UnsafePathError(
            f"outputs {path!r} is not a regular file or a folder", field="outputs"
        )
    check_not_hard_link(real, path, field="outputs")
    return [(path, real)]


def _never(name: str, real: Path) -> int:  # pragma: no cover - a plan without files
    raise AssertionError(f"nothing was to be stored, yet {name} was")


def _unreachable(url: str, transport: httpx.BaseTransport | None) -> str | None:
    """Why the server at ``url`` cannot be reached from here (its ``/healthz``), or None."""
    try:
        with httpx.Client(base_url=url, transport=transport, timeout=PROBE_TIMEOUT_S) as http:
            http.get("/healthz")
    except httpx.HTTPError as exc:
        return (
            f"the shipyard server at {url} cannot be reached from the job's node ({exc}); the "
            "URL jobs reach the server at (SHIPYARD_SERVER_URL) must be one the Ray nodes can "
            "open"
        )
    return None


def _snapshot_files(ctx: Context, job_id: str) -> set[str]:
    with ctx.db.read() as s:
        row = s.get(JobRow, job_id)
        digest = row.code_digest if row is not None else None
    if digest is None:
        return set()
    try:
        return set(list_code(ctx.blobs.get_bytes(digest)))
    except (ShipyardError, OSError):
        return set()


def _other_files(root: Path, code: set[str], declared: list[str]) -> tuple[list[str], int]:
    """The first ``MAX_LISTED`` files under ``root`` (sorted walk) that are neither code nor
    declared, and how many there are; caches (``__pycache__``...) are not counted."""
    taken = set(declared)
    listed: list[str] = []
    total = scanned = 0
    real_root = os.path.realpath(root)
    if not os.path.isdir(real_root):
        return [], 0
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, real_root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        dirnames[:] = sorted(
            name for name in dirnames if name not in SKIP_DIRS and _join(rel_dir, name) not in taken
        )
        for name in sorted(filenames):
            scanned += 1
            if scanned > MAX_SCANNED:
                return listed, total
            rel = _join(rel_dir, name)
            if rel in code or rel in taken or name.endswith(SKIP_SUFFIXES):
                continue
            total += 1
            if len(listed) < MAX_LISTED:
                listed.append(rel)
    return listed, total


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ShipyardError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)  # pragma: no cover


def _names(names: list[str], *, total: int | None = None) -> str:
    shown = names[:MAX_LISTED]
    more = (total if total is not None else len(names)) - len(shown)
    text = ", ".join(shown)
    return f"{text} and {more} more" if more > 0 else text


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _size(size: int) -> str:
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


__all__ = [
    "MAX_LISTED",
    "OutputsPlan",
    "OutputsReport",
    "collect_outputs",
    "plan_outputs",
    "store_outputs",
    "upload_outputs",
]
