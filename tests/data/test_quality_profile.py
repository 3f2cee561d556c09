"""The public profile API (shipyard.data.profile) that commits, signals and drift monitors share:
profiling a table in memory gives what a commit stores, and re-profiling a stored version's files
gives its stored profile back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shipyard.context import Context
from shipyard.data import datasets, profile
from shipyard.domain.models import FileEntry

P = "default"


def test_profile_table_states_the_statistics_contract() -> None:
    table = pa.table(
        {
            "x": pa.array([1.0, float("nan"), None, 3.0, 8.0]),
            "n": pa.array([1, 2, 3, 4, 5], pa.int16()),
            "s": pa.array(["a", "b", None, "b", "c"]).dictionary_encode(),
            "flag": pa.array([True, False, None, True, True]),
        }
    )

    got = profile.profile_table(table, path="t.parquet")

    assert (got.path, got.rows) == ("t.parquet", 5)
    cols = {c.name: c for c in got.columns}
    finite = np.array([1.0, 3.0, 8.0])
    assert (cols["x"].count, cols["x"].nulls, cols["x"].min, cols["x"].max) == (4, 1, 1.0, 8.0)
    assert cols["x"].mean == pytest.approx(finite.mean())
    assert cols["x"].std == pytest.approx(finite.std())
    assert (cols["n"].type, cols["n"].mean) == ("int16", 3.0)
    assert (cols["s"].type, cols["s"].distinct, cols["s"].nulls) == ("string", 3, 1)
    assert (cols["flag"].type, cols["flag"].count, cols["flag"].min) == ("bool", 4, None)


def test_profile_files_recomputes_a_stored_versions_profile(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    rng = np.random.default_rng(0)
    pq.write_table(
        pa.table({"a": rng.normal(size=300), "b": rng.integers(0, 9, 300)}), root / "t.parquet"
    )
    (root / "u.csv").write_text("k,v\nx,1\ny,\n")
    (root / "broken.parquet").write_bytes(b"nope")
    (root / "notes.txt").write_text("not a table")
    version = datasets.commit_directory(ctx, project=P, name="d", source=root)
    files = datasets.list_files(ctx, project=P, name="d")

    calls: list[str] = []
    again = profile.profile_files(ctx, files, progress=lambda done, total, path: calls.append(path))

    assert again == version.profile
    assert [t.path for t in again.tables] == ["t.parquet", "u.csv"]
    assert calls == [f.path for f in files]
    read = pq.read_table(root / "t.parquet")
    assert profile.profile_table(read, path="t.parquet") == version.profile.tables[0]
    # a known profile (by digest) is taken as it is: the content is not read again
    digest = {f.path: f.digest for f in files}["t.parquet"]
    fake = version.profile.tables[1].model_copy(update={"rows": 12345})
    reused = profile.profile_files(ctx, files, known={digest: fake})
    assert reused.tables[0].rows == 12345 and reused.tables[0].path == "t.parquet"


def test_read_table_says_why_a_table_cannot_be_read(ctx: Context) -> None:
    put = ctx.blobs.put_bytes(b"nope")
    read = profile.read_table(ctx, FileEntry(path="x.parquet", digest=put.digest, size=put.size))
    assert read.table is None and read.error is not None
    assert read.error.startswith("cannot be read as a table: ")
    huge = FileEntry(path="big.csv", digest=put.digest, size=profile.PROFILE_MAX_BYTES + 1)
    assert profile.read_table(ctx, huge).error == (
        f"larger than {profile.PROFILE_MAX_BYTES} bytes; not profiled"
    )
    checks = profile.readable_checks("x.parquet", None, read.error)
    assert [(c.check, c.passed) for c in checks] == [("readable:x.parquet", False)]
    assert profile.is_table("A/B.CSV") and not profile.is_table("a.json")
