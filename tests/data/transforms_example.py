"""Example transforms for ``tests/data/test_transform.py``: imported by dotted name in the
transform's worker processes (``tests.data.transforms_example:NAME``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc


def scale(batch: pa.RecordBatch, *, column: str, factor: float) -> pa.RecordBatch:
    """Add ``{column}_scaled``: the column times ``factor``."""
    scaled = pc.multiply(batch.column(column).cast(pa.float64()), factor)
    return batch.append_column(f"{column}_scaled", scaled)


def counted(batch: pa.RecordBatch, *, marks: str, **_: object) -> pa.Table:
    """Return the batch unchanged, leaving one file in ``marks`` per call (to count calls)."""
    Path(marks, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    return pa.Table.from_batches([batch])


def fail_on(batch: pa.RecordBatch, *, column: str, value: int) -> pa.RecordBatch:
    """Raise on the batch whose ``column`` holds ``value``."""
    if value in batch.column(column).to_pylist():
        raise ValueError(f"bad value {value} in {column}")
    return batch


def keep_even(batch: pa.RecordBatch, *, column: str) -> pa.RecordBatch | None:
    """Only the rows whose ``column`` is even; drop a batch left empty."""
    kept = batch.filter(pc.equal(pc.bit_wise_and(batch.column(column), 1), 0))
    return kept if kept.num_rows else None


def wrong_type(batch: pa.RecordBatch) -> list[int]:
    return [batch.num_rows]


def die(batch: pa.RecordBatch) -> pa.RecordBatch:
    os._exit(3)


def shout(path: str, data: bytes, *, drop: str = "") -> bytes | None:
    """Files mode: upper-case the text; drop files whose name ends with ``drop``."""
    if drop and path.endswith(drop):
        return None
    return data.upper()


NOT_CALLABLE = 42
