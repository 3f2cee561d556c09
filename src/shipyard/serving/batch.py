"""Batch inference: run a registered ONNX model over a dataset version's tables and commit the
predictions as a new dataset version, with lineage.

``batch_predict`` resolves ``MODEL@REF`` (an alias, ``vN`` or ``latest``) and ``DATASET@V``,
verifies the model's bytes against their digest and loads them once here (external data refused,
as for serving), then plans every table before any work: which columns feed which model input,
checked against the model's signature, so a mismatch fails at once naming the model's inputs and
the table's columns. The columns feed the model as follows:

- ``input_column``: that one column (a list or fixed-size-list column of numbers, or a scalar
  column for an input of rank 1) is the model's single input;
- ``columns``: those scalar numeric columns, stacked in the order given, ``[n, len(columns)]``;
- by default: when every model input has a column of its name, each takes its column; else a
  model with one input takes the table's one list column, or else all its numeric columns in the
  table's order (the ``keep`` columns left out).

Each output becomes one column named after it (``[n]`` a scalar column, ``[n, k]`` a fixed-size
list of ``k`` values), after the ``keep`` columns copied through (an id, say). Every table
``x.parquet`` (or ``x.csv``) of the source gives a Parquet table ``x.parquet`` in the output
version; other files are left out. A table without rows gives one without rows, typed from the
model's declared outputs.

**Local** (``on="local"``): a pool of ``workers`` spawned processes (:mod:`._batch_worker`: they
import onnxruntime, numpy and pyarrow only), each with its own session of one intra-op thread,
started and loaded before the first batch. Tables are read as Arrow record batches in chunks of
several model batches (one task each, ``2 * workers`` in flight, results written in order); a
worker runs the model ``batch_rows`` rows at a time on numpy views of the columns (no copy when a
fixed-size-list column already has the input's type). With ``workers=1`` (the default on a
machine of one CPU) there is no pool: the model runs in the calling process on the session
already loaded to check the plan -- a worker would only add its start (0.3 s) and the pickling
of every chunk, on the same core.

**Ray** (``on="ray"``): each table becomes a Ray Dataset (``ray.data.from_arrow``, blocks of
many model batches) mapped with ``map_batches`` over an actor pool of ``workers`` actors
(``concurrency=workers``, one CPU each) that each hold a session; the results come back here,
are put in row order and written as above. The nodes need shipyard installed (the actor class is
:class:`._batch_worker.Predictor`).

Either way nothing is committed unless every batch succeeded, and a failure names the table, the
batch (its index and rows) and the reason. The output is committed as the next version of ``to``
(:func:`shipyard.data.datasets.commit_files`) with lineage edges ``dataset_version
-[batch_inference]-> dataset_version`` and ``model_version -[batch_inference]-> dataset_version``
and a ``model.batch_predict`` audit event naming the model version, its digest, the source
version and the column mapping -- in one transaction.

This module is a service on a :class:`~shipyard.context.Context` (the embedded home, or a
server's host); ``shipyard batch`` runs it as a job (see :mod:`shipyard.cli.main`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import sys
import tempfile
import types
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from shipyard.blobs.store import hash_bytes
from shipyard.compute.executors.base import ExecutorUnavailableError
from shipyard.compute.executors.ray import RayExecutor
from shipyard.context import Context
from shipyard.data import datasets, transform
from shipyard.data.profile import PROFILE_MAX_BYTES, profile_table
from shipyard.domain.models import DatasetVersion, FileEntry, ModelVersion, TableProfile
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import BackendError, InvalidInputError
from shipyard.security import audit
from shipyard.security.blobrefs import add_refs
from shipyard.security.rbac import authorize
from shipyard.serving import _batch_worker as worker
from shipyard.serving.runtime import OnnxModel, TensorSpec, load_model
from shipyard.store.queries import add_edge, project_id
from shipyard.tracking import registry

On = Literal["local", "ray"]
BACKENDS: tuple[str, ...] = ("local", "ray")
RELATION = "batch_inference"
BATCH_ROWS = 256
DEFAULT_MODEL_REF = "production"
# Rows sent to a worker in one task: many model batches, so a task's pickling and hand-over
# cost little next to the model's work.
CHUNK_ROWS = 16384
# Rows of one Ray Data block.
RAY_BLOCK_ROWS = 16384

RowProgress = Callable[[int, int, str], None]  # (rows done, rows known so far, table path)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


@dataclass(frozen=True)
class _Table:
    """One source table, planned: its entry, output path, plan, row count (None: a CSV, known
    once read) and, for a version of one table, its bytes (read once)."""

    entry: FileEntry
    out_path: str
    plan: worker.Plan
    rows: int | None
    data: bytes | bytearray | None = None

    def read(self, ctx: Context) -> bytes | bytearray:
        return self.data if self.data is not None else _table_bytes(ctx, self.entry.digest)


def batch_predict(
    ctx: Context,
    *,
    project: str,
    model: str,
    source: str,
    to: str,
    columns: Sequence[str] | None = None,
    input_column: str | None = None,
    keep: Sequence[str] = (),
    workers: int | None = None,
    batch_rows: int = BATCH_ROWS,
    on: On = "local",
    ray_address: str | None = None,
    progress: RowProgress | None = None,
) -> DatasetVersion:
    """Predict with ``model`` (``NAME@REF``; ``NAME`` for ``production``) over version
    ``source`` (``NAME@V``; ``NAME`` for the latest) and commit the predictions as the next
    version of dataset ``to`` (see the module notes). ``workers``: processes (local) or actors
    (Ray), by default ``min(CPUs, 4)``. ``progress(rows_done, rows_total, path)`` after each
    chunk."""
    validate_name(project, field="project")
    validate_name(to, field="to")
    count = default_workers() if workers is None else workers
    if count < 1:
        raise InvalidInputError("workers must be at least 1", field="workers")
    if batch_rows < 1:
        raise InvalidInputError("batch_rows must be at least 1", field="batch_rows")
    if on not in BACKENDS:
        raise InvalidInputError(f"on {on!r} is not one of {', '.join(BACKENDS)}", field="on")
    if columns is not None and input_column is not None:
        raise InvalidInputError("give --columns or --input-column, not both", field="input_column")
    address = transform._ray_address(ctx, ray_address) if on == "ray" else None
    authorize(ctx, project=project, need=Role.EDITOR)
    version, model_bytes, onnx = _model(ctx, project=project, ref=model)
    found = _source(ctx, project=project, ref=source)
    label = f"model {version.model} v{version.version}"
    tables = _plan(
        ctx,
        project=project,
        found=found,
        model=onnx,
        label=label,
        columns=None if columns is None else list(columns),
        input_column=input_column,
        keep=list(keep),
        batch_rows=batch_rows,
    )
    with tempfile.TemporaryDirectory(prefix="batch-") as tmp:
        if address is None:
            outputs, rows = _run_local(
                ctx,
                tables,
                model_bytes,
                onnx,
                Path(tmp),
                workers=count,
                label=label,
                progress=progress,
            )
        else:
            outputs, rows = _run_ray(
                ctx, tables, model_bytes, Path(tmp), address, workers=count, label=label
            )
        entries, stored, profiles = _store(ctx, project=project, outputs=outputs)
    message = (
        f"batch inference with {version.model} v{version.version} over "
        f"{found.dataset}@v{found.version}"
    )
    # the blobs were hashed as they were stored and the tables profiled as they were written:
    # the commit neither re-hashes nor re-reads them
    out = datasets.commit_stored(
        ctx,
        project=project,
        name=to,
        files=entries,
        message=message,
        stored=stored,
        profiles=profiles,
    )
    _record(
        ctx,
        project=project,
        source=found,
        model=version,
        out=out,
        tables=tables,
        rows=rows,
        on=on,
    )
    return out


# --- resolving and planning ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Output:
    """One written output table: its file and its profile (None: left to the commit)."""

    file: Path
    profile: TableProfile | None


def _store(
    ctx: Context, *, project: str, outputs: dict[str, _Output]
) -> tuple[list[FileEntry], frozenset[str], dict[str, TableProfile]]:
    """Put the written files into the blob store (the project then holds them): their entries,
    the digests of the blobs this put created (hashed on the way in) and the profiles by
    digest."""
    entries: list[FileEntry] = []
    created: set[str] = set()
    profiles: dict[str, TableProfile] = {}
    for path, output in outputs.items():
        put = ctx.blobs.put_file(output.file)
        if put.created:
            created.add(put.digest)
        if output.profile is not None:
            profiles[put.digest] = output.profile
        entries.append(FileEntry(path=path, digest=put.digest, size=put.size))
    if entries:
        with ctx.db.transaction() as s:
            digests = sorted({e.digest for e in entries})
            add_refs(s, project_pk=project_id(s, project, create=True), digests=digests)
    return entries, frozenset(created), profiles


def _model(ctx: Context, *, project: str, ref: str) -> tuple[ModelVersion, bytes, OnnxModel]:
    """The model version, its bytes (verified against their digest by the blob store) and the
    model loaded once here, which refuses external data and what ONNX Runtime cannot load."""
    name, _, alias = ref.partition("@")
    version = registry.get_version(ctx, project=project, model=name, ref=alias or DEFAULT_MODEL_REF)
    if version.format != "onnx":
        raise InvalidInputError(
            f"model {name} v{version.version} is {version.format!r}; batch inference runs ONNX "
            "models",
            field="model",
        )
    data = ctx.blobs.get_bytes(version.artifact_digest)
    return version, data, load_model(data, providers=["CPUExecutionProvider"], intra_op_threads=1)


def _source(ctx: Context, *, project: str, ref: str) -> DatasetVersion:
    name, _, number = ref.partition("@")
    return datasets.get_version(ctx, project=project, name=name, version=number or None)


def _plan(
    ctx: Context,
    *,
    project: str,
    found: DatasetVersion,
    model: OnnxModel,
    label: str,
    columns: list[str] | None,
    input_column: str | None,
    keep: list[str],
    batch_rows: int,
) -> list[_Table]:
    """Every table of the version, planned against the model (reading only each table's
    schema); the first mismatch is an error before any work."""
    files = datasets.list_files(ctx, project=project, name=found.dataset, version=found.version)
    entries = [f for f in files if f.path.lower().endswith(datasets.TABLE_SUFFIXES)]
    if not entries:
        raise InvalidInputError(
            f"{found.dataset}@v{found.version} has no tables (.parquet, .csv) to predict on",
            field="input",
        )
    planned = []
    for entry, out_path in transform._row_outputs(entries):
        data = _table_bytes(ctx, entry.digest)
        schema, rows = _schema(entry.path, data)
        plan = plan_table(
            model,
            schema,
            what=f"table {entry.path!r}",
            label=label,
            columns=columns,
            input_column=input_column,
            keep=keep,
            batch_rows=batch_rows,
        )
        held = data if len(entries) == 1 else None
        planned.append(_Table(entry=entry, out_path=out_path, plan=plan, rows=rows, data=held))
    return planned


def _table_bytes(ctx: Context, digest: str) -> bytes | bytearray:
    """A table's bytes, verified against their digest. From a local store they are read into
    one buffer and hashed once (``get_bytes`` verifies a chunked blob's every chunk, then
    joins them into a copy and hashes the whole again: a third of the time of a large batch
    job's overhead); on a mismatch ``get_bytes`` reads them again and raises its error.

    The buffer is a plain ``bytearray``: an uninitialised Arrow or numpy buffer measured slower
    in a fresh process (their allocators ask for huge pages, whose faults may compact memory),
    though faster when a warm process reuses freed memory."""
    if not ctx.blobs.is_local:
        return ctx.blobs.get_bytes(digest)
    segments = ctx.blobs.segments(digest)
    data = bytearray(sum(length for _, _, length in segments))
    view, at = memoryview(data), 0
    for path, offset, length in segments:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            while length:
                got = fh.readinto(view[at : at + length])
                if not got:
                    return ctx.blobs.get_bytes(digest)  # shorter than its index says
                at, length = at + got, length - got
    if hash_bytes(view) != digest:
        return ctx.blobs.get_bytes(digest)
    return data


def plan_table(
    model: OnnxModel,
    schema: pa.Schema,
    *,
    what: str,
    label: str,
    columns: list[str] | None = None,
    input_column: str | None = None,
    keep: Sequence[str] = (),
    batch_rows: int = BATCH_ROWS,
) -> worker.Plan:
    """How the columns of ``schema`` feed ``model`` (see the module notes); InvalidInputError
    naming the model's inputs and the table's columns when they do not fit."""

    def refuse(reason: str, fix: str = "", field: str = "columns") -> InvalidInputError:
        return InvalidInputError(
            f"{label} does not fit {what}: {reason}. The model takes {_inputs_text(model)}; "
            f"the table has {_columns_text(schema)}" + (f"; {fix}" if fix else ""),
            field=field,
        )

    names = schema.names
    for name in [*keep, *(columns or []), *([input_column] if input_column else [])]:
        if name not in names:
            raise refuse(f"it has no column {name!r}", field="columns")
    clash = sorted(set(keep) & set(model.output_names))
    if clash:
        raise refuse(
            f"--keep {', '.join(clash)} would clash with the model's output of that name",
            field="keep",
        )
    for spec in model.inputs:
        if spec.datatype in ("BYTES", "BF16"):
            raise refuse(f"input {spec.name!r} is {spec.datatype}; batch inference feeds numbers")
    if input_column is not None or columns is not None or not _by_name(model, names):
        if len(model.inputs) != 1:
            raise refuse(
                "a model with several inputs takes each from the column of its name",
                "add those columns",
            )
        spec = model.inputs[0]
        chosen = _choose(schema, spec, columns, input_column, keep, refuse)
        feeds: tuple[worker.Feed, ...] = (_feed(schema, spec, chosen, refuse),)
    else:
        feeds = tuple(_feed(schema, s, [s.name], refuse) for s in model.inputs)
    outputs = tuple(
        worker.Output(
            name=t.name,
            dtype=t.dtype.str if t.dtype.kind != "O" else "object",
            inner=tuple(t.shape[1:]) if t.shape else (),
        )
        for t in model.outputs
    )
    return worker.Plan(feeds=feeds, outputs=outputs, keep=tuple(keep), batch_rows=batch_rows)


def _by_name(model: OnnxModel, names: list[str]) -> bool:
    return all(spec.name in names for spec in model.inputs)


def _choose(
    schema: pa.Schema,
    spec: TensorSpec,
    columns: list[str] | None,
    input_column: str | None,
    keep: Sequence[str],
    refuse: Callable[..., InvalidInputError],
) -> list[str]:
    """The columns feeding a model's single input: those given, or the table's one list
    column, or its numeric columns in order (``keep`` left out)."""
    if input_column is not None:
        return [input_column]
    if columns is not None:
        if not columns:
            raise refuse("--columns names no column")
        return columns
    free = [f for f in schema if f.name not in keep]
    lists = [f.name for f in free if _is_list(f.type)]
    if len(lists) == 1:
        return lists
    numeric = [f.name for f in free if _is_number(f.type)]
    if not numeric:
        raise refuse("it has no numeric column to feed the model", "choose with --input-column")
    return numeric


def _feed(
    schema: pa.Schema,
    spec: TensorSpec,
    chosen: list[str],
    refuse: Callable[..., InvalidInputError],
) -> worker.Feed:
    shape = spec.shape
    rank = None if shape is None else len(shape)
    dtype = spec.dtype.str
    if len(chosen) == 1 and _is_list(schema.field(chosen[0]).type):
        kind = schema.field(chosen[0]).type
        if not _is_number(kind.value_type):
            raise refuse(f"column {chosen[0]!r} holds {kind.value_type}, not numbers")
        if rank is not None and rank != 2:
            raise refuse(f"a list column feeds an input of rank 2, and {spec.name!r} has {rank}")
        width = kind.list_size if pa.types.is_fixed_size_list(kind) else None
        if shape is not None and width is not None and shape[1] >= 0 and shape[1] != width:
            raise refuse(
                f"column {chosen[0]!r} holds {width} values a row and input {spec.name!r} "
                f"takes {shape[1]}"
            )
        return worker.Feed(input=spec.name, columns=(chosen[0],), stacked=False, dtype=dtype)
    wrong = [name for name in chosen if not _is_number(schema.field(name).type)]
    if wrong:
        raise refuse(
            f"column(s) {', '.join(repr(n) for n in wrong)} are not numeric",
            "choose the feature columns with --columns a,b,c (or --keep id to pass one through)",
        )
    if rank == 1:
        if len(chosen) != 1:
            raise refuse(f"input {spec.name!r} has rank 1 and takes one column, not {len(chosen)}")
        return worker.Feed(input=spec.name, columns=(chosen[0],), stacked=False, dtype=dtype)
    if rank is not None and rank != 2:
        raise refuse(f"input {spec.name!r} has rank {rank}; columns feed an input of rank 2")
    if shape is not None and shape[1] >= 0 and shape[1] != len(chosen):
        raise refuse(
            f"{len(chosen)} feature column(s) ({', '.join(chosen)}) for input {spec.name!r}, "
            f"which takes {shape[1]}",
            "choose them with --columns a,b,c or --input-column NAME",
        )
    return worker.Feed(input=spec.name, columns=tuple(chosen), stacked=True, dtype=dtype)


def _is_list(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)
    )


def _is_number(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    )


def _inputs_text(model: OnnxModel) -> str:
    return ", ".join(
        f"{t.name} ({t.datatype} {list(t.shape) if t.shape is not None else '[?]'})"
        for t in model.inputs
    )


def _columns_text(schema: pa.Schema) -> str:
    shown = [f"{f.name}: {f.type}" for f in schema][:30]
    more = f", ... ({len(schema) - 30} more)" if len(schema) > 30 else ""
    return f"columns {', '.join(shown)}{more}" if shown else "no columns"


def _schema(path: str, data: bytes | bytearray) -> tuple[pa.Schema, int | None]:
    if path.lower().endswith(".parquet"):
        parquet = pq.ParquetFile(pa.BufferReader(data))
        return parquet.schema_arrow, parquet.metadata.num_rows
    return pa_csv.open_csv(pa.BufferReader(data)).schema, None


# --- running here -------------------------------------------------------------------------------


def _run_local(
    ctx: Context,
    tables: list[_Table],
    model: bytes,
    loaded: OnnxModel,
    tmp: Path,
    *,
    workers: int,
    label: str,
    progress: RowProgress | None,
) -> tuple[dict[str, _Output], int]:
    """Every table through the model: in this process on the session already loaded when
    ``workers`` is 1 (a worker process would only add its start and the pickling of every
    chunk, on the same core), else through a pool of ``workers`` processes. The written Parquet
    files (and their profiles) by output path, and the rows predicted."""
    outputs: dict[str, _Output] = {}
    total = sum(t.rows or 0 for t in tables)
    done = 0
    with contextlib.ExitStack() as stack:
        pool = None if workers == 1 else stack.enter_context(_pool(workers, model, label))
        for n, table in enumerate(tables):
            data = table.read(ctx)
            dest = tmp / f"{n}.parquet"
            if pool is None:
                results = _here(loaded.session, table, data, label)
            else:
                results = _there(pool, table, data, label, window=2 * workers)
            with _Writer(dest, table.plan.keep) as writer:
                for rows, result in results:
                    writer.write(result)
                    done += rows
                    if table.rows is None:
                        total += rows
                    if progress is not None:
                        progress(done, total, table.entry.path)
            outputs[table.out_path] = _Output(dest, writer.profile())
    return outputs, done


def _here(
    session: Any, table: _Table, data: bytes | bytearray, label: str
) -> Iterator[tuple[int, pa.Table]]:
    """The table's chunks predicted in this process: ``(rows, predictions)`` in order."""
    for piece, first_batch, first_row in _chunks(table, data, threads=False):
        try:
            result = worker.run_chunk(session, table.plan, piece, first_batch, first_row)
        except worker.WorkerError as exc:
            raise _failed(label, table.entry.path, exc.args[0], exc.args[1]) from None
        yield piece.num_rows, result


def _there(
    pool: cf.Executor, table: _Table, data: bytes | bytearray, label: str, *, window: int
) -> Iterator[tuple[int, pa.Table]]:
    """The table's chunks predicted by the pool, ``window`` in flight, in order."""
    tasks = (
        (
            (first_batch, piece.num_rows),
            pool.submit(worker.predict_chunk, table.plan, piece, first_batch, first_row),
        )
        for piece, first_batch, first_row in _chunks(table, data, threads=True)
    )
    for (first_batch, rows), future in _windowed(tasks, window):
        yield rows, _result(future, label, table.entry.path, first_batch)


def _chunks(
    table: _Table, data: bytes | bytearray, *, threads: bool
) -> Iterator[tuple[pa.RecordBatch, int, int]]:
    """The table in chunks of whole model batches: ``(chunk, first batch index, first row)``."""
    batch_rows = table.plan.batch_rows
    chunk = max(batch_rows, CHUNK_ROWS // batch_rows * batch_rows)
    first_batch, first_row = 0, 0
    for piece in _pieces(table.entry.path, data, chunk, threads=threads):
        yield piece, first_batch, first_row
        first_batch += max(1, -(-piece.num_rows // batch_rows))
        first_row += piece.num_rows


def _pieces(
    path: str, data: bytes | bytearray, rows: int, *, threads: bool
) -> Iterator[pa.RecordBatch]:
    """A Parquet table's record batches of ``rows`` rows, decoded on Arrow's threads or (for a
    model run here, which keeps this core busy: the threads only add hand-overs) on this one;
    a CSV's as transform reads them."""
    parquet = pq.ParquetFile(pa.BufferReader(data)) if path.lower().endswith(".parquet") else None
    if parquet is None or parquet.metadata.num_rows == 0:
        yield from transform._batches(path, bytes(data), rows)  # a CSV: the copy is minor
        return
    yield from parquet.iter_batches(batch_size=rows, use_threads=threads)


def _windowed(
    tasks: Iterator[tuple[Any, cf.Future[Any]]], window: int
) -> Iterator[tuple[Any, cf.Future[Any]]]:
    """The tasks in order, at most ``window`` in flight; what is still queued is cancelled
    when the caller stops early (an error)."""
    pending: deque[tuple[Any, cf.Future[Any]]] = deque()
    try:
        for task in tasks:
            pending.append(task)
            if len(pending) >= window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        for _, future in pending:
            future.cancel()


def _result(future: cf.Future[pa.Table], label: str, path: str, first_batch: int) -> pa.Table:
    try:
        return future.result()
    except worker.WorkerError as exc:
        raise _failed(label, path, exc.args[0], exc.args[1]) from None
    except cf.process.BrokenProcessPool:
        raise _failed(
            label,
            path,
            f"batch {first_batch} or a later one: its worker process died (killed, or out of "
            "memory)",
        ) from None


def _failed(label: str, path: str, what: str, trace: str = "") -> InvalidInputError:
    return InvalidInputError(
        f"batch inference with {label} failed on table {path!r} {what}; nothing was committed",
        field="input",
        traceback=trace,
    )


class _Writer:
    """One output table: Parquet, every part in one schema. Dictionary encoding only for the
    kept columns that are not numbers (a label, a name): on predictions and numeric ids (unique
    values) it costs up to four times the write and makes the file larger.

    The parts written are kept (they are in memory already) so that, once the file is closed,
    :meth:`profile` gives the profile the commit would compute by reading the file back: the
    parts as one table, cast to the file's own Arrow schema (as a reader sees it: a list's item
    is named ``element`` there), its number columns in one chunk as ``profile.parse_table``
    reads them (see :func:`_as_read`). Past ``PROFILE_MAX_BYTES`` in memory the parts are
    dropped and the commit profiles the file itself."""

    def __init__(self, dest: Path, keep: Sequence[str] = ()) -> None:
        self.dest = dest
        self.keep = list(keep)
        self._writer: pq.ParquetWriter | None = None
        self._parts: list[pa.Table] | None = []
        self._held = 0

    def __enter__(self) -> _Writer:
        return self

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            words = [n for n in self.keep if not _is_number(table.schema.field(n).type)]
            self._writer = pq.ParquetWriter(self.dest, table.schema, use_dictionary=words)
        elif not table.schema.equals(self._writer.schema):
            table = table.cast(self._writer.schema)  # e.g. a list typed from the signature
        self._writer.write_table(table)
        if self._parts is not None:
            self._held += table.nbytes
            if self._held > PROFILE_MAX_BYTES:
                self._parts = None
            else:
                self._parts.append(table)

    def profile(self) -> TableProfile | None:
        """The written file's profile (``path`` empty), or None: left to the commit (too large,
        nothing written, or a table Arrow will not put in one chunk)."""
        parts, self._parts = self._parts, None
        if not parts or not self.dest.exists() or self.dest.stat().st_size > PROFILE_MAX_BYTES:
            return None
        try:
            schema = pq.read_schema(self.dest)
            table = pa.concat_tables(parts)
            if table.schema.names != schema.names:
                return None
            columns = [_as_read(table.column(i), field.type) for i, field in enumerate(schema)]
            table = pa.Table.from_arrays(columns, schema=schema)
        except (pa.ArrowException, OSError):
            return None
        return profile_table(table, path="")

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()


def _as_read(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    """``column`` as a reader of its file gets it, for profiling: of the file's type, and a
    number column in one chunk (its mean and deviation are summed chunk by chunk). Other
    columns keep their chunks: what is profiled of them (counts, distinct values) does not
    depend on them, and joining a list column of predictions would copy it all."""
    column = column.cast(kind)  # even when "equal": that ignores the names of list items
    if column.num_chunks > 1 and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        column = pa.chunked_array([column.combine_chunks()], type=kind)
    return column


@contextlib.contextmanager
def _pool(workers: int, model: bytes, label: str) -> Iterator[cf.ProcessPoolExecutor]:
    """``workers`` spawned processes, each holding a session of ``model``, started (and the
    model loaded) before any data is sent; on an error queued tasks are dropped."""
    pool = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=worker.init_worker,
        initargs=(model, 1),
    )
    failed = True
    try:
        with _main_hidden():  # the pool starts a process per submit while none is idle
            started = [pool.submit(worker.ready) for _ in range(workers)]
        for future in started:
            try:
                future.result()
            except cf.process.BrokenProcessPool:
                raise BackendError(
                    f"the batch-inference worker processes could not load {label} (they died "
                    "starting); nothing was committed",
                    field="workers",
                ) from None
        yield pool
        failed = False
    finally:
        pool.shutdown(wait=True, cancel_futures=failed)


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Spawned processes run the parent's ``__main__`` again (for ``shipyard`` that is the whole
    CLI: seconds of imports per worker); ours need nothing from it, so while they start, the
    main module is a bare one."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


# --- running on Ray -----------------------------------------------------------------------------


def _run_ray(
    ctx: Context,
    tables: list[_Table],
    model: bytes,
    tmp: Path,
    address: str,
    *,
    workers: int,
    label: str,
) -> tuple[dict[str, _Output], int]:
    """Every table as a Ray Dataset mapped over an actor pool of ``workers`` sessions."""
    executor = RayExecutor(address)
    outputs: dict[str, _Output] = {}
    rows = 0
    try:
        transform._probe(executor.host, executor.port, address)
        try:
            with executor._connected() as ray, warnings.catch_warnings():
                # Ray Data's own DataContext() warns about its deprecated defaults (Ray 2.60).
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
                for n, table in enumerate(tables):
                    data = table.read(ctx)
                    dest = tmp / f"{n}.parquet"
                    found, profile = _ray_table(
                        ray, table, data, model, dest, workers=workers, label=label
                    )
                    rows += found
                    outputs[table.out_path] = _Output(dest, profile)
        except ExecutorUnavailableError as exc:
            raise transform._unreachable(address, exc.reason) from None
    finally:
        executor.close()
    return outputs, rows


def _ray_table(
    ray: types.ModuleType,
    table: _Table,
    data: bytes | bytearray,
    model: bytes,
    dest: Path,
    *,
    workers: int,
    label: str,
) -> tuple[int, TableProfile | None]:
    """One table through :func:`._batch_worker.run_dataset`, a Ray task (no CPU of its own)
    that runs the Ray Data pipeline on the cluster; the result is written here. Its rows and
    profile."""
    source = _read(table.entry.path, data)
    if source.num_rows == 0:
        empty = worker.empty_schema(table.plan, source.schema)
        with _Writer(dest, table.plan.keep) as writer:
            writer.write(pa.Table.from_batches([], schema=empty))
        return 0, writer.profile()
    source = source.append_column(
        worker.ROW_COLUMN, pa.array(np.arange(source.num_rows, dtype=np.int64))
    )
    blocks = [
        source.slice(start, RAY_BLOCK_ROWS) for start in range(0, source.num_rows, RAY_BLOCK_ROWS)
    ]
    task = ray.remote(worker.run_dataset).options(num_cpus=0, max_retries=0)
    try:
        result = ray.get(task.remote(blocks, model, table.plan, workers))
    except Exception as exc:
        raise _failed(label, table.entry.path, _ray_reason(ray, exc)) from None
    with _Writer(dest, table.plan.keep) as writer:
        writer.write(result)
    return int(result.num_rows), writer.profile()


def _ray_reason(ray: types.ModuleType, error: BaseException) -> str:
    """What failed: the worker's own message (a batch, named), else what Ray says."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, worker.WorkerError):
        return str(cause.args[0])
    text = (str(error).strip().splitlines() or [""])[0][:300]
    return f"on Ray ({type(error).__name__}: {text})"


def _read(path: str, data: bytes | bytearray) -> pa.Table:
    if path.lower().endswith(".parquet"):
        return pq.ParquetFile(pa.BufferReader(data)).read()  # no pyarrow.dataset (nor pandas)
    return pa_csv.read_csv(pa.BufferReader(data))


# --- lineage ------------------------------------------------------------------------------------


def _record(
    ctx: Context,
    *,
    project: str,
    source: DatasetVersion,
    model: ModelVersion,
    out: DatasetVersion,
    tables: list[_Table],
    rows: int,
    on: str,
) -> None:
    """The edges source -> output and model -> output, and the audit event, in one
    transaction."""
    with ctx.db.transaction() as s:
        for kind, node in (("dataset_version", source.id), ("model_version", model.id)):
            add_edge(
                s,
                source_kind=kind,
                source_id=node,
                target_kind="dataset_version",
                target_id=out.id,
                relation=RELATION,
            )
        audit.record(
            s,
            actor=ctx.actor,
            action="model.batch_predict",
            resource=f"project/{project}/dataset/{out.dataset}/version/{out.version}",
            details={
                "model": model.model,
                "model_version": model.version,
                "model_version_id": model.id,
                "model_digest": model.artifact_digest,
                "source": f"{source.dataset}@v{source.version}",
                "source_version_id": source.id,
                "output_version_id": out.id,
                "rows": rows,
                "on": on,
                "tables": {
                    t.entry.path: {f.input: list(f.columns) for f in t.plan.feeds} for t in tables
                },
                "keep": list(tables[0].plan.keep) if tables else [],
                "batch_rows": tables[0].plan.batch_rows if tables else BATCH_ROWS,
            },
        )
