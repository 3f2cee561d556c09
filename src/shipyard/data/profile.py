"""Dataset profiles: what a version's tables look like (schema and per-column statistics).

Every commit profiles the tables it holds (Parquet and CSV files) and stores the result on the
version (:attr:`DatasetVersion.profile`). The same functions are the public API for whoever needs
to compare data with a version later - a drift monitor compares served payloads with the training
data's profile, the poisoning signals compare a new version with its parent - so the numbers are
computed one way everywhere:

- :func:`profile_table` profiles an Arrow table already in memory;
- :func:`profile_files` profiles the tables among a version's files, read from the blob store
  (``profile_files(ctx, datasets.list_files(ctx, project=..., name=..., version=...))``
  recomputes a stored version's profile);
- :func:`read_table` loads one table file the way the profile reads it (size limit, readable
  reasons), for checks that need the rows themselves.

Statistics follow one contract: ``count`` is the number of non-null values and ``nulls`` the
number of nulls; numbers get ``min``/``max``/``mean``/``std`` (population standard deviation,
NaN ignored, non-finite results dropped); strings get ``distinct``; dictionary-encoded columns
are profiled as their value type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from shipyard.context import Context
from shipyard.domain.models import (
    ColumnProfile,
    DatasetProfile,
    FileEntry,
    TableProfile,
    ValidationResult,
)

__all__ = [
    "PROFILE_MAX_BYTES",
    "TABLE_SUFFIXES",
    "Progress",
    "TableRead",
    "is_table",
    "parse_table",
    "profile_column",
    "profile_files",
    "profile_table",
    "read_table",
    "readable_checks",
]

Progress = Callable[[int, int, str], None]
"""``progress(done_bytes, total_bytes, path)``, called after each file."""

TABLE_SUFFIXES = (".parquet", ".csv")
PROFILE_MAX_BYTES = 512 * 1024 * 1024
"""Tables larger than this are not loaded for profiling (it would need their whole content in
memory); the skip is recorded as a failed ``readable`` check rather than silently."""


@dataclass(frozen=True)
class TableRead:
    """One table file as read for profiling: the table, or why it could not be read."""

    path: str
    table: pa.Table | None
    error: str | None = None


def is_table(path: str) -> bool:
    """Whether ``path`` names a file that is profiled as a table (by its suffix)."""
    return path.lower().endswith(TABLE_SUFFIXES)


def parse_table(path: str, data: bytes | bytearray | memoryview) -> pa.Table:
    """Parse a CSV (by suffix) or Parquet file's bytes into an Arrow table.

    A Parquet file is read through ``pq.ParquetFile``, not ``pq.read_table``: the latter goes
    through ``pyarrow.dataset``, whose import brings pandas in (0.7 s in a fresh process, on
    every commit that profiles a table)."""
    if path.lower().endswith(".csv"):
        return pa_csv.read_csv(pa.BufferReader(data))
    return pq.ParquetFile(pa.BufferReader(data)).read()


def read_table(ctx: Context, entry: FileEntry) -> TableRead:
    """Load the table file ``entry`` from the blob store, or say why not (too large, unreadable).

    An unreadable table is not an exception: a dataset may hold a broken file, and the commit
    records that as a failed check instead of refusing the version.
    """
    if entry.size > PROFILE_MAX_BYTES:
        return TableRead(entry.path, None, f"larger than {PROFILE_MAX_BYTES} bytes; not profiled")
    try:
        return TableRead(entry.path, parse_table(entry.path, ctx.blobs.get_bytes(entry.digest)))
    except (pa.ArrowException, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return TableRead(entry.path, None, f"cannot be read as a table: {reason}")


def profile_table(table: pa.Table, *, path: str) -> TableProfile:
    """The profile of ``table``, recorded under ``path``: its row count and every column's."""
    columns = [profile_column(n, table.column(n)) for n in table.column_names]
    return TableProfile(path=path, rows=table.num_rows, columns=columns)


def profile_column(name: str, column: pa.ChunkedArray | pa.Array) -> ColumnProfile:
    """Type, non-null ``count`` and ``nulls``; min/max/mean/std (population, NaN ignored) for
    numbers; ``distinct`` for strings."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
        column = column.cast(kind)
    nulls = column.null_count
    stats: dict[str, Any] = {}
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        stats = _number_stats(column, floating=pa.types.is_floating(kind))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        stats = {"distinct": pc.count_distinct(column, mode="only_valid").as_py()}
    return ColumnProfile(name=name, type=str(kind), count=len(column) - nulls, nulls=nulls, **stats)


def profile_files(
    ctx: Context,
    files: Sequence[FileEntry],
    *,
    known: Mapping[str, TableProfile] | None = None,
    progress: Progress | None = None,
) -> DatasetProfile:
    """The profile of a set of files (a version's): counts, bytes, and each table's profile.

    ``known`` maps content digests to profiles already computed (a parent version's), so a table
    whose content did not change is not read again. Unreadable tables are left out; the commit
    records why through :func:`readable_checks`.
    """
    cache = dict(known or {})
    total = sum(f.size for f in files)
    done = 0
    tables: list[TableProfile] = []
    for entry in files:
        if is_table(entry.path):
            found = cache.get(entry.digest)
            if found is None:
                read = read_table(ctx, entry)
                if read.table is not None:
                    found = cache[entry.digest] = profile_table(read.table, path=entry.path)
            if found is not None:
                tables.append(found.model_copy(update={"path": entry.path}))
        done += entry.size
        if progress is not None:
            progress(done, total, entry.path)
    return DatasetProfile(files=len(files), bytes=total, tables=tables)


def readable_checks(
    path: str, profile: TableProfile | None, error: str | None
) -> list[ValidationResult]:
    """The checks every table gets, with or without a validation suite: it can be read, it has
    rows, and no column is entirely null. They never block a commit (recorded as results)."""
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


def _number_stats(column: pa.ChunkedArray | pa.Array, *, floating: bool) -> dict[str, Any]:
    values = pc.filter(column, pc.invert(pc.is_nan(column))) if floating else column
    if len(values) - values.null_count == 0:
        return {}
    try:
        bounds = pc.min_max(values)
        return {
            "min": _finite(bounds["min"].as_py()),
            "max": _finite(bounds["max"].as_py()),
            "mean": _finite(pc.mean(values).as_py()),
            "std": _finite(pc.stddev(values, ddof=0).as_py()),
        }
    except pa.ArrowNotImplementedError:
        return {}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
