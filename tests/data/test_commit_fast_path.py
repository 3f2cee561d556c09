"""The commit of files a process has just stored and profiled (``datasets.commit_stored``, used
by batch inference): the profile it records is the one the ordinary commit computes by reading
the file, the blobs it stored are not re-hashed, the others still are; and a commit does not
import pandas (0.7 s of every fresh process that commits a table)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shipyard.context import Context
from shipyard.data import datasets
from shipyard.data.profile import profile_files
from shipyard.domain.models import FileEntry
from shipyard.errors import ConflictError
from shipyard.serving.batch import _Writer

P = "default"


def _part(start: int, rows: int, rng: np.random.Generator) -> pa.Table:
    """A part as batch inference writes one: a kept id and name, a scalar and a list output."""
    values = rng.standard_normal(rows).astype(np.float32)
    values[::7] = np.nan
    names = [None if (start + i) % 11 == 0 else f"row-{(start + i) % 5}" for i in range(rows)]
    return pa.table(
        {
            "id": pa.array(np.arange(start, start + rows, dtype=np.int64)),
            "name": pa.array(names, pa.string()),
            "score": pa.array(values),
            "probabilities": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.random(rows * 3).astype(np.float32)), 3
            ),
            "label": pa.array(rng.integers(0, 10, rows), pa.int64()),
        }
    )


def _written(dest: Path, sizes: list[int]) -> _Writer:
    rng = np.random.default_rng(7)
    with _Writer(dest, keep=["id", "name"]) as writer:
        start = 0
        for rows in sizes:
            writer.write(_part(start, rows, rng))
            start += rows
    return writer


@pytest.mark.parametrize("sizes", [[16384, 16384, 5000], [3], [0]])
def test_the_fast_path_records_the_profile_the_ordinary_commit_computes(
    ctx: Context, tmp_path: Path, sizes: list[int]
) -> None:
    dest = tmp_path / "out.parquet"
    profile = _written(dest, sizes).profile()
    assert profile is not None
    put = ctx.blobs.put_file(dest)
    files = [FileEntry(path="scores/part-0.parquet", digest=put.digest, size=put.size)]

    fast = datasets.commit_stored(
        ctx,
        project=P,
        name="fast",
        files=files,
        stored=frozenset({put.digest}),
        profiles={put.digest: profile},
    )
    slow = datasets.commit_files(ctx, project=P, name="slow", files=files)

    assert fast.profile == slow.profile
    assert fast.profile == profile_files(ctx, files)  # the file read back and profiled
    assert fast.validation == slow.validation
    assert fast.profile.tables[0].rows == sum(sizes)
    assert fast.manifest_digest == slow.manifest_digest


def test_the_blobs_it_stored_are_not_hashed_again_the_others_are(
    ctx: Context, tmp_path: Path
) -> None:
    dest = tmp_path / "out.parquet"
    profile = _written(dest, [100]).profile()
    assert profile is not None
    put = ctx.blobs.put_file(dest)
    files = [FileEntry(path="t.parquet", digest=put.digest, size=put.size)]
    # the content rots after the put: only a re-hash (or a read) can notice
    blob = Path(ctx.blobs._path(put.digest))
    blob.write_bytes(bytes(b ^ 0xFF for b in blob.read_bytes()))

    with pytest.raises(ConflictError) as caught:  # not declared as stored: re-hashed, refused
        datasets.commit_stored(
            ctx, project=P, name="other", files=files, stored=frozenset(), profiles={}
        )
    assert caught.value.field == "files[0].digest" and put.digest in caught.value.message

    assert ctx.blobs.put_file(dest).created  # moved aside by the refusal: stored whole again
    blob.write_bytes(bytes(b ^ 0xFF for b in blob.read_bytes()))
    version = datasets.commit_stored(
        ctx,
        project=P,
        name="mine",
        files=files,
        stored=frozenset({put.digest}),
        profiles={put.digest: profile},
    )
    # committed without reading the blob: the profile is the one given
    assert version.version == 1 and version.profile.tables[0] == profile.model_copy(
        update={"path": "t.parquet"}
    )


def test_an_undeclared_table_is_still_profiled_by_reading_it(ctx: Context, tmp_path: Path) -> None:
    dest = tmp_path / "out.parquet"
    _written(dest, [50])
    put = ctx.blobs.put_file(dest)
    files = [FileEntry(path="t.parquet", digest=put.digest, size=put.size)]
    version = datasets.commit_stored(
        ctx, project=P, name="ds", files=files, stored=frozenset({put.digest}), profiles={}
    )
    assert version.profile == profile_files(ctx, files)
    assert version.profile.tables[0].rows == 50


def test_a_writer_past_the_profile_limit_leaves_the_profile_to_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shipyard.serving import batch

    monkeypatch.setattr(batch, "PROFILE_MAX_BYTES", 1000)
    assert _written(tmp_path / "out.parquet", [100, 100]).profile() is None


def test_the_manifest_is_the_same_parquet_as_before(ctx: Context) -> None:
    entries = [FileEntry.trusted(f"dir/é-{i}.parquet", f"{i:064x}", i * 1000) for i in range(3)] + [
        FileEntry.trusted("z.txt", "f" * 64, 0)
    ]
    data = datasets._manifest_bytes(entries)
    columns = {
        "path": [e.path for e in entries],
        "digest": [e.digest for e in entries],
        "size": [e.size for e in entries],
    }
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns, schema=datasets.MANIFEST_SCHEMA), sink)
    assert data == sink.getvalue().to_pybytes()  # same bytes, so the same manifest digest
    table = pq.ParquetFile(pa.BufferReader(data)).read()
    table.validate(full=True)
    assert table.to_pydict() == columns


COMMIT_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from shipyard.context import open_context
from shipyard.data import datasets
from shipyard.settings import Settings

folder = Path(sys.argv[1])
folder.mkdir()
values = np.arange(1000, dtype=np.float64)
table = pa.Table.from_arrays(
    [pa.Array.from_buffers(pa.float64(), len(values), [None, pa.py_buffer(values)])], names=["x"]
)
pq.write_table(table, folder / "t.parquet")
ctx = open_context(Settings(home=Path(sys.argv[2])), actor="tester")
version = datasets.commit_directory(ctx, project="default", name="ds", source=folder)
assert version.profile.tables[0].rows == 1000, version.profile
print("pandas" in sys.modules, "pyarrow.dataset" in sys.modules)
"""


def test_a_commit_that_profiles_a_table_does_not_import_pandas(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", COMMIT_IN_A_FRESH_PROCESS, str(tmp_path / "src"), str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"]
