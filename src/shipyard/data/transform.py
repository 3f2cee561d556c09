"""Transforms: run a user function over a dataset version and commit the result as a new version.

``transform`` reads the source version (``NAME@V``) and calls a function named by its dotted
path (``pkg.module:function``) in a pool of worker processes (spawned, so each imports the
function itself), in one of two modes:

- ``rows``: every table file (Parquet or CSV) is read as Arrow record batches and each batch is
  passed as ``fn(batch: pa.RecordBatch, **params) -> pa.RecordBatch | pa.Table | None`` (``None``
  drops the batch; a table whose every batch is dropped is left out). Each table's results are
  written, in batch order, as one Parquet file at the table's path (``x.csv`` becomes
  ``x.parquet``); the other files of the version are kept as they are. A table with no rows is
  passed once as an empty batch, so its output schema is known.
- ``files``: every file is passed as ``fn(path: str, data: bytes, **params) -> bytes | None``;
  the returned bytes are stored at the same path, ``None`` drops the file.
- ``auto``: ``rows`` when the version holds a table, ``files`` otherwise.

The outputs are committed with :func:`shipyard.data.datasets.commit_files` as the next version of
dataset ``to``; nothing is committed unless every batch or file succeeded. The commit's lineage
is an edge ``dataset_version -[transform]-> dataset_version`` plus a ``dataset.transform`` audit
event naming the function, its code digest and the parameters.

The run is cached: its key hashes the source version (id and manifest digest), the code digest
(the function's module source file and qualified name: code it imports is not covered), the mode
and the canonical JSON of ``params``. The key, with the output dataset, is kept in the
``dataset_transforms`` table beside the output version's id (and written into its message,
``[transform KEY]``, for people): a later call with the same key and output dataset returns that
version, while it is live, without running anything -- also when the run's output was the same
as the output dataset's latest version and no new version was written.

**On Ray** (``on="ray"``): the batches or files run as Ray tasks (``call_batch`` / ``call_file``,
one CPU each, no retries) on the cluster at ``ray_address`` -- by default the Ray executor's
(``SHIPYARD_EXECUTOR=ray://HOST:PORT``) -- through the process's one Ray Client connection
(:mod:`shipyard.compute.executors.ray`). Plain tasks, not Ray Data: they go through the same ordered
window as the local pool (``2 * workers`` in flight), so a failure names its table and batch
index, results are written in batch order, and nothing is committed until every task succeeded.
The function's top-level package (or module file) is shipped with the tasks (zipped, ``ray.put``
once, unpacked onto the workers' ``sys.path``) unless it is installed in this Python (then the
cluster's nodes must have it installed too); code it imports from elsewhere must be installed
there.
Result, lineage and cache are those of a local run: the cache key does not name the backend.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import inspect
import io
import json
import multiprocessing
import os
import re
import socket
import sys
import tempfile
import threading
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from sqlalchemy import select

from shipyard.blobs import hash_bytes
from shipyard.compute.executors.base import ExecutorUnavailableError
from shipyard.compute.executors.ray import PROBE_TIMEOUT_S, SCHEME, RayExecutor, parse_url
from shipyard.context import Context
from shipyard.data import datasets
from shipyard.data._transform_worker import (
    CODE_ENV,
    WorkerError,
    call_batch,
    call_file,
    call_with_code,
    import_object,
    init_worker,
)
from shipyard.data.datasets import Progress
from shipyard.domain.models import DatasetVersion, FileEntry
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import BackendError, InvalidInputError
from shipyard.security import audit
from shipyard.security.blobrefs import add_refs
from shipyard.security.rbac import authorize
from shipyard.store.queries import add_edge, project_id
from shipyard.store.tables import DatasetRow, DatasetTransformRow, DatasetVersionRow, utcnow

Mode = Literal["rows", "files", "auto"]
MODES: tuple[str, ...] = ("rows", "files", "auto")
On = Literal["local", "ray"]
BACKENDS: tuple[str, ...] = ("local", "ray")
RELATION = "transform"
BATCH_ROWS = 65_536

_FN_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_KEY_RE = re.compile(r"\[transform ([0-9a-f]{64})\]")


@dataclass(frozen=True)
class Function:
    """A resolved ``--fn``: its dotted reference and the digest of its code."""

    ref: str
    code_digest: str


def transform(
    ctx: Context,
    *,
    project: str,
    source: str,
    fn: str,
    to: str,
    params: dict[str, Any] | None = None,
    mode: Mode = "auto",
    workers: int = 2,
    batch_rows: int = BATCH_ROWS,
    search_path: Sequence[str | Path] = (),
    progress: Progress | None = None,
    on: On = "local",
    ray_address: str | None = None,
) -> DatasetVersion:
    """Run ``fn`` over version ``source`` (``NAME@V``; ``NAME`` for the latest) and commit the
    result as the next version of dataset ``to`` (see the module notes); the cached output
    version when this source version, code and ``params`` ran before.

    ``search_path``: folders put in front of ``sys.path`` (here and in the workers) to import
    ``fn`` from (the CLI passes its working folder). ``batch_rows``: the most rows of one batch
    (part of the cache key, since a function may depend on how rows are grouped).
    ``progress(done, total, path)`` counts the source bytes handled, after each file.
    ``on``: ``local`` (a pool of ``workers`` processes here) or ``ray`` (tasks on the Ray cluster
    at ``ray_address``, by default ``SHIPYARD_EXECUTOR``'s; ``2 * workers`` of them in flight).
    """
    validate_name(project, field="project")
    validate_name(to, field="to")
    if mode not in MODES:
        raise InvalidInputError(f"mode {mode!r} is not one of {', '.join(MODES)}", field="mode")
    if workers < 1:
        raise InvalidInputError("workers must be at least 1", field="workers")
    if batch_rows < 1:
        raise InvalidInputError("batch_rows must be at least 1", field="batch_rows")
    if on not in BACKENDS:
        raise InvalidInputError(f"on {on!r} is not one of {', '.join(BACKENDS)}", field="on")
    address = _ray_address(ctx, ray_address) if on == "ray" else None
    authorize(ctx, project=project, need=Role.EDITOR)
    name, _, ref = source.partition("@")
    found = datasets.get_version(ctx, project=project, name=name, version=ref or None)
    paths = [str(Path(p).resolve()) for p in search_path]
    function = resolve_function(fn, search_path=paths)
    arguments = dict(params or {})
    files = datasets.list_files(ctx, project=project, name=name, version=found.version)
    chosen = _choose_mode(mode, files)
    key = cache_key(found, function, chosen, arguments, batch_rows=batch_rows)
    cached = _cached(ctx, project=project, source=found, to=to, key=key)
    if cached is not None:
        return cached
    pool_cm = _pool(workers, paths) if address is None else _ray_pool(address, function.ref)
    with pool_cm as pool, tempfile.TemporaryDirectory(prefix="transform-") as tmp:
        run = _Run(
            ctx, pool, function.ref, arguments, Path(tmp), window=2 * workers, rows=batch_rows
        )
        outputs = run.rows(files, progress) if chosen == "rows" else run.files(files, progress)
        if not outputs:
            raise InvalidInputError(
                f"{fn} dropped every file of {name}@v{found.version}; nothing to commit",
                field="fn",
            )
        entries = _store(ctx, project=project, outputs=outputs)
    message = f"transform {function.ref} of {name}@v{found.version} [transform {key}]"
    out = datasets.commit_files(ctx, project=project, name=to, files=entries, message=message)
    _record(
        ctx,
        project=project,
        source=found,
        out=out,
        function=function,
        key=key,
        params=arguments,
        mode=chosen,
    )
    return out


def resolve_function(fn: str, *, search_path: Sequence[str] = ()) -> Function:
    """Import ``pkg.module:function`` (with ``search_path`` in front of ``sys.path``) and digest
    its module's source file and qualified name; a clear error when it does not resolve."""
    if not _FN_RE.fullmatch(fn):
        raise InvalidInputError(f"--fn {fn!r} is not of the form pkg.module:function", field="fn")
    target = import_object(fn, search_path)
    module_name, _, qualname = fn.partition(":")
    module = sys.modules[module_name]
    try:
        source_file = inspect.getsourcefile(module)
    except TypeError:
        source_file = None
    if source_file is None or not os.path.isfile(source_file):
        raise InvalidInputError(
            f"--fn {fn!r}: module {module_name!r} has no Python source file to digest; define "
            "the function in a .py file",
            field="fn",
        )
    if not callable(target):
        raise InvalidInputError(f"--fn {fn!r} is not a function", field="fn")
    code = Path(source_file).read_bytes() + b"\0" + qualname.encode()
    return Function(ref=fn, code_digest=hash_bytes(code))


def cache_key(
    source: DatasetVersion,
    function: Function,
    mode: str,
    params: dict[str, Any],
    *,
    batch_rows: int = BATCH_ROWS,
) -> str:
    """The digest naming one run: source version, code, mode and parameters."""
    try:
        canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"params must be plain JSON (strings, numbers, booleans, lists, objects): {exc}",
            field="params",
        ) from None
    material = {
        "source": source.id,
        "manifest": source.manifest_digest,
        "fn": function.ref,
        "code": function.code_digest,
        "mode": mode,
        "batch_rows": batch_rows if mode == "rows" else None,
        "params": canonical,
    }
    return hash_bytes(json.dumps(material, sort_keys=True).encode())


# --- running ------------------------------------------------------------------------------------


class _Run:
    """One pass over the source files: tasks go to the pool through a window of ``window``
    futures, results come back in order."""

    def __init__(
        self,
        ctx: Context,
        pool: cf.Executor,
        fn: str,
        params: dict[str, Any],
        tmp: Path,
        *,
        window: int,
        rows: int,
    ) -> None:
        self.ctx, self.pool, self.fn, self.params, self.tmp = ctx, pool, fn, params, tmp
        self.window, self.batch_rows = window, rows

    def rows(self, files: list[FileEntry], progress: Progress | None) -> dict[str, Path | str]:
        """Output path -> a written Parquet file (a table) or the kept file's digest."""
        outputs: dict[str, Path | str] = {}
        total, done = sum(f.size for f in files), 0
        for n, (entry, out_path) in enumerate(_row_outputs(files)):
            if entry.path.endswith(datasets.TABLE_SUFFIXES):
                written = self._table(entry, self.tmp / f"{n}.parquet")
                if written is not None:
                    outputs[out_path] = written
            else:
                outputs[out_path] = entry.digest
            done += entry.size
            if progress is not None:
                progress(done, total, entry.path)
        return outputs

    def files(self, files: list[FileEntry], progress: Progress | None) -> dict[str, Path | str]:
        """Output path -> a written file, for the files ``fn`` kept."""
        outputs: dict[str, Path | str] = {}
        total, done = sum(f.size for f in files), 0

        def tasks() -> Iterator[tuple[FileEntry, cf.Future[bytes | None]]]:
            for entry in files:
                data = self.ctx.blobs.get_bytes(entry.digest)
                yield entry, self.pool.submit(call_file, self.fn, entry.path, data, self.params)

        for entry, future in self._windowed(tasks()):
            result = _result(future, f"file {entry.path!r}", self.fn)
            if result is not None:
                dest = self.tmp / f"{len(outputs)}.bin"
                dest.write_bytes(result)
                outputs[entry.path] = dest
            done += entry.size
            if progress is not None:
                progress(done, total, entry.path)
        return outputs

    def _table(self, entry: FileEntry, dest: Path) -> Path | None:
        """Run every batch of one table; the Parquet file written, or None if all were dropped."""
        data = self.ctx.blobs.get_bytes(entry.digest)

        def tasks() -> Iterator[tuple[int, cf.Future[pa.Table | None]]]:
            for index, batch in enumerate(_batches(entry.path, data, self.batch_rows)):
                yield index, self.pool.submit(call_batch, self.fn, batch, self.params)

        writer: pq.ParquetWriter | None = None
        try:
            for index, future in self._windowed(tasks()):
                what = f"table {entry.path!r} batch {index}"
                table = _result(future, what, self.fn)
                if table is None:
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(dest, table.schema)
                elif not table.schema.equals(writer.schema):
                    raise InvalidInputError(
                        f"{self.fn} failed on {what}: it returned columns {table.schema.names} "
                        f"typed differently from the earlier batches' {writer.schema.names}; "
                        "return one schema for every batch",
                        field="fn",
                    )
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        return dest if writer is not None else None

    def _windowed(self, tasks: Iterator[tuple[Any, cf.Future[Any]]]) -> Iterator[Any]:
        """The tasks in order, keeping at most ``window`` of them in flight; cancels what is
        still queued when the caller stops early (an error)."""
        pending: deque[tuple[Any, cf.Future[Any]]] = deque()
        try:
            for task in tasks:
                pending.append(task)
                if len(pending) >= self.window:
                    yield pending.popleft()
            while pending:
                yield pending.popleft()
        finally:
            for _, future in pending:
                future.cancel()


def _batches(path: str, data: bytes, rows: int) -> Iterator[pa.RecordBatch]:
    """The table's record batches of at most ``rows`` rows; one empty batch (with its schema)
    when it has no rows."""
    if path.endswith(".parquet"):
        parquet = pq.ParquetFile(pa.BufferReader(data))
        schema = parquet.schema_arrow
        batches: Iterator[pa.RecordBatch] = parquet.iter_batches(batch_size=rows)
    else:
        reader = pa_csv.open_csv(pa.BufferReader(data))
        schema = reader.schema
        batches = iter(reader)
    any_batch = False
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            any_batch = True
            yield batch.slice(start, rows)
    if not any_batch:
        yield pa.RecordBatch.from_pylist([], schema=schema)


def _result(future: cf.Future[Any], what: str, fn: str) -> Any:
    try:
        return future.result()
    except WorkerError as exc:
        raise InvalidInputError(
            f"{fn} failed on {what}: {exc.args[0]}; nothing was committed",
            field="fn",
            traceback=exc.args[1],
        ) from None
    except _TaskLost as exc:
        raise InvalidInputError(
            f"{fn} failed on {what}: {exc}; nothing was committed", field="fn"
        ) from None
    except cf.process.BrokenProcessPool:
        raise InvalidInputError(
            f"{fn} failed on {what}: its worker process died (killed, out of memory, or a "
            "script calling transform outside `if __name__ == '__main__':`, which the spawned "
            "workers run again); nothing was committed",
            field="fn",
        ) from None


def _row_outputs(files: list[FileEntry]) -> list[tuple[FileEntry, str]]:
    """Each file with the path its output takes in rows mode (a table's ends in .parquet);
    checked before anything runs, so two files never claim one path."""
    planned: list[tuple[FileEntry, str]] = []
    claimed: dict[str, str] = {}
    for entry in files:
        path = entry.path
        if path.endswith(datasets.TABLE_SUFFIXES):
            path = Path(path).with_suffix(".parquet").as_posix()
        if path in claimed:
            raise InvalidInputError(
                f"{entry.path!r} and {claimed[path]!r} would both be written to {path!r}; "
                "rename one of them, or use --mode files",
                field="source",
            )
        claimed[path] = entry.path
        planned.append((entry, path))
    return planned


def _choose_mode(mode: Mode, files: list[FileEntry]) -> str:
    tables = any(f.path.endswith(datasets.TABLE_SUFFIXES) for f in files)
    if mode == "auto":
        return "rows" if tables else "files"
    if mode == "rows" and not tables:
        raise InvalidInputError(
            "the version has no table files (.parquet, .csv) to transform by rows; use "
            "--mode files",
            field="mode",
        )
    return mode


@contextlib.contextmanager
def _pool(workers: int, search_path: Sequence[str]) -> Iterator[cf.ProcessPoolExecutor]:
    """Spawned workers (no state inherited from this process) that put ``search_path`` first on
    ``sys.path``; on an error the queued tasks are dropped before waiting for the running ones."""
    pool = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(list(search_path),),
    )
    failed = True
    try:
        yield pool
        failed = False
    finally:
        pool.shutdown(wait=True, cancel_futures=failed)


# --- Ray ---------------------------------------------------------------------------------------


class _TaskLost(Exception):
    """A Ray task that ended without the user's function answering (its worker died, the
    connection was lost, the code did not import on the node): what happened, for the error."""


def _ray_address(ctx: Context, given: str | None) -> str:
    """``given``, else the Ray executor's address (``SHIPYARD_EXECUTOR``), checked."""
    configured = ctx.settings.executor
    address = given or (configured if configured.startswith(SCHEME) else None)
    if not address:
        raise InvalidInputError(
            "a transform on Ray needs the cluster's address: pass --ray-address ray://HOST:PORT "
            "(the head node's Ray Client port, 10001 by default) or set "
            "SHIPYARD_EXECUTOR=ray://HOST:PORT",
            field="ray_address",
        )
    try:
        parse_url(address)
    except InvalidInputError:
        raise InvalidInputError(
            f"--ray-address {address!r} is not a Ray address; write ray://HOST:PORT (the head "
            "node's Ray Client port, 10001 by default)",
            field="ray_address",
        ) from None
    return address


@contextlib.contextmanager
def _ray_pool(address: str, fn: str) -> Iterator[_RayPool]:
    """Tasks on the Ray cluster at ``address``, through the process's Ray Client connection
    (shared with a Ray executor of the same address, and closed after us if we opened it); a
    clear error naming the address when nothing answers there."""
    shipped = _shipped_code(fn)
    executor = RayExecutor(address)
    try:
        _probe(executor.host, executor.port, address)
        try:
            with executor._connected() as ray:
                pool = _RayPool(ray, _code_bundle(shipped))
        except ExecutorUnavailableError as exc:
            raise _unreachable(address, exc.reason) from None
        failed = True
        try:
            yield pool
            failed = False
        finally:
            pool.shutdown(wait=False, cancel_futures=failed)
    finally:
        executor.close()


def _probe(host: str, port: int, address: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise _unreachable(address, f"nothing answers there: {exc.strerror or exc}") from None


def _unreachable(address: str, why: str) -> BackendError:
    return BackendError(
        f"the Ray cluster at {address} cannot be reached ({why}); start it (ray start --head), "
        "pass its Ray Client address with --ray-address ray://HOST:PORT (or set "
        "SHIPYARD_EXECUTOR), or run with --on local; nothing was committed",
        field="ray_address",
    )


def _shipped_code(fn: str) -> list[str]:
    """The folder of ``fn``'s top-level package, or its module's file, to ship to the tasks;
    none when it is installed in this Python (the nodes must have it too)."""
    top = sys.modules[fn.partition(":")[0].split(".")[0]]
    file = getattr(top, "__file__", None)
    if hasattr(top, "__path__"):
        path = Path(file).parent if file else Path(next(iter(top.__path__)))
    elif file:
        path = Path(file)
    else:
        return []
    path = path.resolve()
    installed = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    if any(path.is_relative_to(prefix) for prefix in installed) or top.__name__ == "shipyard":
        return []
    return [str(path)]


def _code_bundle(shipped: list[str]) -> tuple[str, bytes] | None:
    """``shipped`` as a zip (a package folder under its own name, a module file as itself) and
    its digest, for the tasks to unpack onto their ``sys.path``. A task's ``runtime_env`` takes
    local folders only at ``ray.init``, and the Ray Client connection is the process's, opened
    without them (uploading them by hand through Ray Client hangs in Ray 2.60), so we ship it."""
    if not shipped:
        return None
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in map(Path, shipped):
            files = [entry] if entry.is_file() else sorted(entry.rglob("*"))
            for file in files:
                if file.is_file() and "__pycache__" not in file.parts:
                    archive.write(file, file.relative_to(entry.parent).as_posix())
    data = buffer.getvalue()
    return hash_bytes(data), data


class _RayPool(cf.Executor):
    """``call_batch`` / ``call_file`` as Ray tasks, their results as ``concurrent.futures``
    futures so :class:`_Run` uses them as it uses the local pool's. A failure of the user's
    function comes back as the same :class:`WorkerError`; anything else as :class:`_TaskLost`."""

    def __init__(self, ray: ModuleType, code: tuple[str, bytes] | None) -> None:
        self._ray = ray
        # One code version per worker process: other code (another digest) gets other workers,
        # so a worker never holds an older import of a module.
        env = {"env_vars": {CODE_ENV: code[0]}} if code else {}
        self._task = ray.remote(call_with_code).options(num_cpus=1, max_retries=0, runtime_env=env)
        self._code = (code[0], ray.put(code[1])) if code else (None, None)
        self._pending: dict[int, Any] = {}  # the tasks not yet answered, by id(ref)
        self._lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        ref = self._task.remote(*self._code, fn, *args, **kwargs)
        with self._lock:
            self._pending[id(ref)] = ref
        outer: cf.Future[Any] = cf.Future()

        def done(inner: cf.Future[Any]) -> None:
            with self._lock:
                self._pending.pop(id(ref), None)
            if not outer.set_running_or_notify_cancel():
                return  # cancelled by the window: nobody waits for it
            error = inner.exception()
            if error is None:
                outer.set_result(inner.result())
            else:
                outer.set_exception(self._failure(error))

        ref.future().add_done_callback(done)
        return outer

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """After an error, cancel the tasks still queued or running on the cluster."""
        if not cancel_futures:
            return
        with self._lock:
            refs = list(self._pending.values())
            self._pending.clear()
        for ref in refs:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref)

    def _failure(self, error: BaseException) -> BaseException:
        exceptions = self._ray.exceptions
        if isinstance(error, exceptions.RayTaskError):
            cause = getattr(error, "cause", None)
            if isinstance(cause, WorkerError):
                return WorkerError(*cause.args)
            return _TaskLost(f"its Ray task failed ({type(cause).__name__}: {cause})")
        if isinstance(error, exceptions.WorkerCrashedError | exceptions.NodeDiedError):
            return _TaskLost(
                f"its Ray worker process died (killed, or out of memory): {_first_line(error)}"
            )
        return _TaskLost(f"its Ray task was lost ({type(error).__name__}: {_first_line(error)})")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


# --- storing, cache and lineage -----------------------------------------------------------------


def _store(ctx: Context, *, project: str, outputs: dict[str, Path | str]) -> list[FileEntry]:
    """Put the written files into the blob store (the project then holds them) and list every
    output; a kept file's digest is already the project's."""
    entries: list[FileEntry] = []
    stored: list[str] = []
    for path, output in outputs.items():
        if isinstance(output, str):
            entries.append(FileEntry(path=path, digest=output, size=ctx.blobs.size(output)))
            continue
        put = ctx.blobs.put_file(output)
        stored.append(put.digest)
        entries.append(FileEntry(path=path, digest=put.digest, size=output.stat().st_size))
    if stored:
        with ctx.db.transaction() as s:
            add_refs(s, project_pk=project_id(s, project, create=True), digests=stored)
    return entries


def _slot(key: str, *, project: str, to: str) -> str:
    """The cache row's key: the run's key for one output dataset of one project."""
    return hash_bytes(f"{key}\0{project}\0{to}".encode())


def _cached(
    ctx: Context, *, project: str, source: DatasetVersion, to: str, key: str
) -> DatasetVersion | None:
    """The live version of ``to`` a run with ``key`` produced from ``source``, if any."""
    with ctx.db.read() as s:
        pid = project_id(s, project, create=False)
        number = s.scalar(
            select(DatasetVersionRow.version)
            .join(
                DatasetTransformRow,
                DatasetTransformRow.output_version_id == DatasetVersionRow.id,
            )
            .join(DatasetRow, DatasetRow.id == DatasetVersionRow.dataset_id)
            .where(
                DatasetTransformRow.key == _slot(key, project=project, to=to),
                DatasetTransformRow.project_id == pid,
                DatasetTransformRow.input_version_id == source.id,
                DatasetRow.project_id == pid,
                DatasetRow.name == to,
                DatasetVersionRow.deleted_at.is_(None),
            )
        )
    if number is None:
        return None
    return datasets.get_version(ctx, project=project, name=to, version=number)


def _record(
    ctx: Context,
    *,
    project: str,
    source: DatasetVersion,
    out: DatasetVersion,
    function: Function,
    key: str,
    params: dict[str, Any],
    mode: str,
) -> None:
    """The cache row, the lineage edge source -> output and the audit event holding the code
    digest."""
    with ctx.db.transaction() as s:
        slot = _slot(key, project=project, to=out.dataset)
        row = s.get(DatasetTransformRow, slot)
        if row is None:
            row = DatasetTransformRow(key=slot, project_id=project_id(s, project, create=False))
            s.add(row)
        row.input_version_id = source.id
        row.code_hash = function.code_digest
        row.params = params
        row.output_version_id = out.id
        row.created_at = utcnow()
        add_edge(
            s,
            source_kind="dataset_version",
            source_id=source.id,
            target_kind="dataset_version",
            target_id=out.id,
            relation=RELATION,
        )
        audit.record(
            s,
            actor=ctx.actor,
            action="dataset.transform",
            resource=f"project/{project}/dataset/{out.dataset}/version/{out.version}",
            details={
                "source": f"{source.dataset}@v{source.version}",
                "source_version_id": source.id,
                "output_version_id": out.id,
                "fn": function.ref,
                "code_digest": function.code_digest,
                "mode": mode,
                "params": params,
                "cache_key": key,
            },
        )


def cache_key_of(version: DatasetVersion) -> str | None:
    """The cache key a transform wrote into ``version``'s message, if it made it."""
    found = _KEY_RE.search(version.message)
    return found.group(1) if found else None
