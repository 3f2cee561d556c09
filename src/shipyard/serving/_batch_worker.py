"""What a batch-inference worker runs: an ONNX Runtime session over Arrow batches.

Kept apart from :mod:`shipyard.serving.batch` so that a spawned worker process (or a Ray Data
actor) imports only onnxruntime, numpy and pyarrow (not even ``pyarrow.compute``: 0.4 s) -- not
the metadata store, the blob store and the registry. The driver has already verified the model's
bytes against their digest and loaded them once with :func:`shipyard.serving.runtime.load_model`
(external data refused); a worker only builds a session from those bytes.

A :class:`Plan` says how a batch's columns become the model's inputs (:class:`Feed`), which
outputs become which columns, and which columns pass through. Each output is one column: a
``[n]`` tensor a scalar column, a ``[n, k, ...]`` tensor (nested) fixed-size lists, built on the
output's memory without a copy.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pyarrow as pa

# The column a Ray Data run numbers its rows with, so results are put back in order and a
# failing batch is named by its rows.
ROW_COLUMN = "__shipyard_row"
# Rows stacked at a time into a model input from scalar columns: a block of them stays in the
# CPU's cache while every column is copied in (about 20% faster than a column at a time).
_STACK_ROWS = 2048
_NAMED = re.compile(r"batch \d+ \(rows \d+-\d+\): [^\n]*")


class WorkerError(Exception):
    """A batch that failed: ``(summary, traceback)``, plain strings that pickle."""


@dataclass(frozen=True)
class Feed:
    """One model input: one column (a list column to ``[n, k]``, a scalar column to ``[n]``),
    or several scalar columns stacked side by side (``[n, len(columns)]``)."""

    input: str
    columns: tuple[str, ...]
    stacked: bool
    dtype: str  # numpy dtype name


@dataclass(frozen=True)
class Output:
    """One model output and the column it becomes; ``dtype`` and ``inner`` (the shape after
    the batch dimension, ``-1`` where unknown) type the column of a table without rows."""

    name: str
    dtype: str
    inner: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    feeds: tuple[Feed, ...]
    outputs: tuple[Output, ...]
    keep: tuple[str, ...]
    batch_rows: int


_session: ort.InferenceSession | None = None


def init_worker(model: bytes, threads: int = 1) -> None:
    """Build this process's session (once): ``threads`` intra-op threads, no spinning."""
    global _session
    _session = session_for(model, threads)


def ready() -> int:
    """A no-op task: the pool starts its workers (and loads the model) before any data."""
    return os.getpid()


def session_for(model: bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def predict_chunk(plan: Plan, batch: pa.RecordBatch, first_batch: int, first_row: int) -> pa.Table:
    """The predictions for ``batch`` (a run of model batches of ``plan.batch_rows`` rows; the
    first is the table's batch ``first_batch``, starting at row ``first_row``)."""
    if _session is None:
        raise WorkerError("the worker has no model loaded (init_worker was not run)", "")
    return run_chunk(_session, plan, batch, first_batch, first_row)


def run_chunk(
    session: ort.InferenceSession,
    plan: Plan,
    batch: pa.RecordBatch | pa.Table,
    first_batch: int,
    first_row: int,
) -> pa.Table:
    """The chunk's columns become arrays once (slicing them per model batch copies nothing);
    the outputs are joined and become columns once."""
    if batch.num_rows == 0:
        return pa.Table.from_batches([], schema=empty_schema(plan, batch.schema))
    step = plan.batch_rows

    def failed(start: int, rows: int, exc: BaseException) -> WorkerError:
        index = first_batch + start // step
        where = f"rows {first_row + start}-{first_row + start + rows - 1}"
        return WorkerError(f"batch {index} ({where}): {_summary(exc)}", traceback.format_exc())

    try:
        feeds = {feed.input: _feed(batch, feed) for feed in plan.feeds}
    except Exception:
        for start in range(0, batch.num_rows, step):  # which batch: the slow way, rarely
            part = batch.slice(start, step)
            try:
                for feed in plan.feeds:
                    _feed(part, feed)
            except Exception as exc:
                raise failed(start, part.num_rows, exc) from None
        raise
    names = [out.name for out in plan.outputs]
    results: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, batch.num_rows, step):
        rows = min(step, batch.num_rows - start)
        try:
            values = session.run(names, {k: v[start : start + rows] for k, v in feeds.items()})
            for name, value, into in zip(names, values, results, strict=True):
                into.append(_rows(name, np.asarray(value), rows))
        except Exception as exc:
            raise failed(start, rows, exc) from None
    columns: dict[str, pa.Array | pa.ChunkedArray] = {k: batch.column(k) for k in plan.keep}
    for name, parts in zip(names, results, strict=True):
        columns[name] = to_arrow(parts[0] if len(parts) == 1 else np.concatenate(parts))
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))


class Predictor:
    """A Ray Data actor (``map_batches(Predictor, concurrency=N)``): one session per actor,
    called on ``pyarrow.Table`` batches that carry :data:`ROW_COLUMN`."""

    def __init__(self, model: bytes, plan: Plan) -> None:
        self.session = session_for(model, 1)
        self.plan = plan

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.column(ROW_COLUMN)
        first = rows[0].as_py() if batch.num_rows else 0
        result = run_chunk(
            self.session, self.plan, batch.drop_columns([ROW_COLUMN]), 0, first
        ).combine_chunks()
        return result.append_column(ROW_COLUMN, rows)


def run_dataset(blocks: list[pa.Table], model: bytes, plan: Plan, workers: int) -> pa.Table:
    """A Ray task: ``blocks`` (numbered by :data:`ROW_COLUMN`) as a Ray Dataset mapped over an
    actor pool of ``workers`` :class:`Predictor` actors; the predictions in row order.

    It runs on the cluster because Ray Data's streaming executor needs a Ray worker process
    (through Ray Client it fails: ``'Worker' object has no attribute 'core_worker'``, Ray
    2.60). A batch that fails comes back as the :class:`WorkerError` naming it."""
    import pyarrow.compute as pc
    import ray.data

    dataset = ray.data.from_arrow(blocks).map_batches(
        Predictor,
        fn_constructor_kwargs={"model": model, "plan": plan},
        batch_size=plan.batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    try:
        parts = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    except Exception as exc:
        found = _worker_error(exc)
        if found is not None:
            raise found from None
        raise
    result = pa.concat_tables(
        [pa.Table.from_batches([p]) if isinstance(p, pa.RecordBatch) else p for p in parts]
    )
    order = pc.sort_indices(result, sort_keys=[(ROW_COLUMN, "ascending")])
    return result.take(order).drop_columns([ROW_COLUMN])


def _worker_error(error: BaseException) -> WorkerError | None:
    """The :class:`WorkerError` inside what Ray Data raised (it wraps the actor's task error,
    whose ``cause`` is ours), or one rebuilt from its text."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, WorkerError):
            return WorkerError(*cause.args)
        seen.add(id(cause))
        cause = cause.__cause__ or getattr(cause, "cause", None) or cause.__context__
    found = _NAMED.search(str(error))
    return WorkerError(found.group(0), "") if found else None


# --- one model batch ----------------------------------------------------------------------------


def _rows(name: str, array: np.ndarray, rows: int) -> np.ndarray:
    if array.ndim == 0 or array.shape[0] != rows:
        raise ValueError(
            f"output {name!r} has shape {list(array.shape)}, not one row per input row ({rows}); "
            "batch inference needs outputs whose first dimension is the batch"
        )
    return array


def _feed(batch: pa.RecordBatch | pa.Table, feed: Feed) -> np.ndarray:
    dtype = np.dtype(feed.dtype)
    if not feed.stacked:
        return column_array(_array(batch, feed.columns[0]), feed.columns[0], dtype)
    rows = batch.num_rows
    columns = [column_array(_array(batch, name), name, dtype) for name in feed.columns]
    out = np.empty((rows, len(columns)), dtype=dtype)
    for start in range(0, rows, _STACK_ROWS):  # a block of rows at a time stays in cache
        block = out[start : start + _STACK_ROWS]
        for j, column in enumerate(columns):
            block[:, j] = column[start : start + _STACK_ROWS]
    return out


def _array(batch: pa.RecordBatch | pa.Table, name: str) -> pa.Array:
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    return column


def column_array(column: pa.Array, name: str, dtype: np.dtype) -> np.ndarray:
    """A column as numpy of ``dtype``: a scalar column ``[n]``, a list column ``[n, k]`` (all
    rows of one length); without a copy where the types already agree."""
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} missing value(s)")
    kind = column.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if pa.types.is_fixed_size_list(kind):
            width = kind.list_size
        else:
            lengths = np.diff(column.offsets.to_numpy())
            low, high = (int(lengths.min()), int(lengths.max())) if len(lengths) else (0, 0)
            if low != high:
                raise ValueError(
                    f"column {name!r} holds lists of {low} to {high} values; every row must "
                    "have the same length"
                )
            width = low
        values = column.flatten()
        if values.null_count:
            raise ValueError(f"column {name!r} has missing values inside its lists")
        return _numpy(values).reshape(len(column), width).astype(dtype, copy=False)
    return _numpy(column).astype(dtype, copy=False)


def _numpy(array: pa.Array) -> np.ndarray:
    """A numeric Arrow array without nulls as numpy on its memory. Not ``to_numpy``: that goes
    through pyarrow's pandas shim and imports pandas, 0.4 s in every fresh worker."""
    kind = array.type
    if pa.types.is_floating(kind) or pa.types.is_integer(kind):
        letter = (
            "f" if pa.types.is_floating(kind) else "i" if pa.types.is_signed_integer(kind) else "u"
        )
        dtype = np.dtype(f"<{letter}{kind.bit_width // 8}")
        offset = array.offset * dtype.itemsize
        return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=offset)
    unpacked: np.ndarray = array.to_numpy(zero_copy_only=False)  # booleans: bits, so a copy
    return unpacked


def to_arrow(array: np.ndarray) -> pa.Array:
    """``[n]`` as a scalar column, ``[n, k, ...]`` as nested fixed-size lists on the same
    memory."""
    if array.ndim == 1:
        return _flat(array)
    values: pa.Array = _flat(array.reshape(-1))
    for size in reversed(array.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def _flat(array: np.ndarray) -> pa.Array:
    """A 1-D numpy array as Arrow on its memory. Not ``pa.array``: that asks whether the array
    is a pandas object and so imports pandas, 0.4 s in every fresh worker."""
    if array.dtype.kind not in "biuf":
        return pa.array(array)
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "b":
        return pa.array(array)  # Arrow packs booleans in bits: a copy either way
    kind = pa.from_numpy_dtype(array.dtype)
    return pa.Array.from_buffers(kind, len(array), [None, pa.py_buffer(array)])


def empty_schema(plan: Plan, source: pa.Schema) -> pa.Schema:
    """The output schema of a table without rows, from the outputs' declared types."""
    fields = [source.field(name) for name in plan.keep]
    for out in plan.outputs:
        dtype = np.dtype(out.dtype)
        kind: pa.DataType = pa.string() if dtype.kind == "O" else pa.from_numpy_dtype(dtype)
        for size in reversed(out.inner):
            kind = pa.list_(kind, size) if size >= 0 else pa.list_(kind)
        fields.append(pa.field(out.name, kind))
    return pa.schema(fields)


def _summary(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:500]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
