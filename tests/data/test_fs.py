"""``shipyard://`` on a real embedded home: real commits, real reads by pandas, pyarrow and
fsspec, ranged reads of a large file within bounded memory, corruption and bad paths."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import blake3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shipyard.client import Client
from shipyard.context import Context
from shipyard.data import datasets
from shipyard.data.fs import (
    DatasetPathNotFoundError,
    ReadOnlyError,
    ShipyardFileSystem,
    arrow_dataset,
    parse_location,
)
from shipyard.errors import IntegrityError, InvalidInputError, UnsafePathError
from shipyard.settings import Settings

P = "default"
BIG = 48 * 1024 * 1024 + 12345  # not a multiple of any block size


@pytest.fixture
def table() -> pa.Table:
    rng = np.random.default_rng(3)
    n = 20_000
    return pa.table(
        {
            "id": np.arange(n),
            "x": rng.normal(size=n),
            "label": rng.choice(np.array(["cat", "dog", "owl"]), n),
        }
    )


@pytest.fixture
def source(tmp_path: Path, table: pa.Table) -> Path:
    root = tmp_path / "src"
    (root / "tables").mkdir(parents=True)
    (root / "images" / "a").mkdir(parents=True)
    pq.write_table(table.slice(0, 12_000), root / "tables" / "part-0.parquet")
    pq.write_table(table.slice(12_000), root / "tables" / "part-1.parquet")
    (root / "labels.csv").write_text("id,label\n1,cat\n2,dog\n")
    (root / "images" / "a" / "1.png").write_bytes(b"\x89PNG fake one")
    (root / "images" / "2.png").write_bytes(b"\x89PNG fake two")
    return root


@pytest.fixture
def committed(ctx: Context, source: Path, home_env: Path) -> Context:
    datasets.commit_directory(ctx, project=P, name="ds", source=source)
    return ctx


@pytest.fixture
def fs(committed: Context) -> ShipyardFileSystem:
    return ShipyardFileSystem()


def _entry_digest(ctx: Context, path: str, version: int = 1) -> str:
    files = datasets.list_files(ctx, project=P, name="ds", version=version)
    return next(f.digest for f in files if f.path == path)


def _corrupt(ctx: Context, digest: str, *, at: int = 0) -> None:
    """Flip one byte of a stored blob where it lies (a loose file or a slice of a pack)."""
    segments = getattr(ctx.blobs, "segments", None)
    if segments is not None:
        file, offset, _ = segments(digest)[0]
    else:
        file, offset = ctx.blobs._path(digest), 0
    os.chmod(file, 0o600)
    with open(file, "r+b") as fh:
        fh.seek(offset + at)
        byte = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([byte[0] ^ 0xFF]))


# --- reads by real libraries --------------------------------------------------------------------


def test_pandas_reads_parquet_and_csv_by_url(committed: Context, table: pa.Table) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(f"shipyard://{P}/ds@v1/tables/part-1.parquet")
    assert frame["id"].tolist() == table.column("id").to_pylist()[12_000:]
    labels = pd.read_csv(f"shipyard://{P}/ds/labels.csv")  # no version: the latest
    assert labels["label"].tolist() == ["cat", "dog"]


def test_pyarrow_reads_a_table_and_a_dataset_of_tables(
    fs: ShipyardFileSystem, table: pa.Table
) -> None:
    one = pq.read_table(f"{P}/ds@v1/tables/part-0.parquet", filesystem=fs, columns=["x"])
    assert one.column("x").to_pylist() == table.column("x").to_pylist()[:12_000]

    whole = arrow_dataset(f"shipyard://{P}/ds@v1/", format="parquet").to_table()
    assert sorted(whole.column("id").to_pylist()) == table.column("id").to_pylist()
    dogs = arrow_dataset(f"shipyard://{P}/ds@latest/tables").to_table(
        filter=pa.compute.field("label") == "dog"
    )
    assert dogs.num_rows == table.filter(pa.compute.equal(table["label"], "dog")).num_rows


def test_fsspec_open_in_text_and_binary_modes(committed: Context) -> None:
    with fsspec.open(f"shipyard://{P}/ds@1/labels.csv", "rt") as fh:
        assert fh.read().splitlines() == ["id,label", "1,cat", "2,dog"]
    with fsspec.open(f"shipyard://{P}/ds@v1/images/2.png", "rb") as fh:
        assert fh.read() == b"\x89PNG fake two"


def test_polars_and_duckdb_read_through_fsspec(committed: Context, table: pa.Table) -> None:
    url = f"shipyard://{P}/ds@v1/tables/part-1.parquet"
    polars = pytest.importorskip("polars")
    with fsspec.open(url, "rb") as fh:
        assert polars.read_parquet(fh)["id"].to_list()[:3] == [12_000, 12_001, 12_002]
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.register_filesystem(ShipyardFileSystem())
    assert con.sql(f"select count(*) from read_parquet('{url}')").fetchone() == (8_000,)


def test_versions_by_number_latest_and_no_version(
    ctx: Context, committed: Context, source: Path, fs: ShipyardFileSystem
) -> None:
    (source / "labels.csv").write_text("id,label\n1,owl\n")
    datasets.commit_directory(ctx, project=P, name="ds", source=source)

    assert fs.cat_file(f"{P}/ds@v1/labels.csv") == b"id,label\n1,cat\n2,dog\n"
    assert fs.cat_file(f"{P}/ds@1/labels.csv") == b"id,label\n1,cat\n2,dog\n"
    for latest in (f"{P}/ds@latest/labels.csv", f"{P}/ds/labels.csv", f"{P}/ds@v2/labels.csv"):
        assert fs.cat_file(latest) == b"id,label\n1,owl\n", latest
    assert fs.info(f"{P}/ds")["version"] == 2
    assert fs.info(f"{P}/ds@v1")["version"] == 1


def test_ls_info_find_glob(fs: ShipyardFileSystem, source: Path) -> None:
    assert fs.ls(f"{P}/ds@v1", detail=False) == [
        f"{P}/ds@v1/images",
        f"{P}/ds@v1/labels.csv",
        f"{P}/ds@v1/tables",
    ]
    assert fs.ls(P, detail=False) == [f"{P}/ds"]
    info = fs.info(f"shipyard://{P}/ds@v1/images/2.png")
    assert info["type"] == "file"
    assert info["size"] == 13
    assert info["digest"] == blake3.blake3(b"\x89PNG fake two").hexdigest()
    assert fs.info(f"{P}/ds@v1/images")["type"] == "directory"
    assert fs.isdir(f"{P}/ds@v1/images/a") and fs.isfile(f"{P}/ds@v1/labels.csv")
    assert not fs.exists(f"{P}/ds@v1/nope.txt")
    assert fs.find(f"{P}/ds@v1/images") == [
        f"{P}/ds@v1/images/2.png",
        f"{P}/ds@v1/images/a/1.png",
    ]
    assert fs.find(f"{P}/ds@v1", maxdepth=1) == [f"{P}/ds@v1/labels.csv"]
    assert fs.glob(f"{P}/ds@v1/**/*.png") == [
        f"{P}/ds@v1/images/2.png",
        f"{P}/ds@v1/images/a/1.png",
    ]
    assert (
        fs.size(f"{P}/ds@v1/tables/part-0.parquet")
        == (source / "tables" / "part-0.parquet").stat().st_size
    )


# --- streaming and ranged reads -----------------------------------------------------------------


@pytest.fixture
def big(ctx: Context, tmp_path: Path, home_env: Path) -> bytes:
    """A large-ish file (48 MiB) in its own dataset."""
    data = np.random.default_rng(11).bytes(BIG)
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(data)
    datasets.commit_directory(ctx, project=P, name="big", source=folder)
    return data


def test_ranged_reads_of_a_large_file_hold_only_what_they_read(big: bytes) -> None:
    fs = ShipyardFileSystem()
    tracemalloc.start()
    try:
        with fs.open(f"{P}/big@v1/blob.bin", "rb", block_size=1024 * 1024) as fh:
            fh.seek(BIG // 2)
            middle = fh.read(100_000)
            fh.seek(BIG - 10)
            tail = fh.read()
            fh.seek(7)
            head = fh.read(5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert middle == big[BIG // 2 : BIG // 2 + 100_000]
    assert tail == big[-10:]
    assert head == big[7:12]
    # the whole-blob verification pass streams too: a few 1 MiB chunks at most, never 48 MiB
    assert peak < 8 * 1024 * 1024, peak
    assert fs.source.is_verified(blake3.blake3(big).hexdigest())


def test_a_sequential_read_streams_and_verifies_as_it_goes(big: bytes) -> None:
    fs = ShipyardFileSystem()
    hasher = blake3.blake3()
    sizes: list[int] = []
    tracemalloc.start()
    try:
        with fs.open(f"shipyard://{P}/big/blob.bin", "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                hasher.update(chunk)
                sizes.append(len(chunk))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(sizes) == BIG and max(sizes) == 1024 * 1024
    assert hasher.hexdigest() == blake3.blake3(big).hexdigest()
    assert peak < 16 * 1024 * 1024, peak  # one read plus the 4 MiB read-ahead block
    assert fs.source.is_verified(blake3.blake3(big).hexdigest())


def test_sdk_open_returns_a_seekable_binary_file(committed: Context, settings: Settings) -> None:
    client = Client(settings=settings)
    with client.datasets.open("ds", "images/a/1.png", version=1) as fh:
        assert fh.read(5) == b"\x89PNG "
        fh.seek(-3, io.SEEK_END)
        assert fh.read() == b"one"
        assert fh.seekable() and fh.tell() == 13
    with client.datasets.open("ds", "labels.csv") as fh:
        assert fh.read() == b"id,label\n1,cat\n2,dog\n"
    with pytest.raises(DatasetPathNotFoundError, match="has no such file"):
        client.datasets.open("ds", "images/3.png")
    with pytest.raises(UnsafePathError):
        client.datasets.open("ds", "../outside.txt")


# --- integrity ----------------------------------------------------------------------------------


def test_a_corrupted_blob_fails_a_sequential_read_naming_the_file(
    committed: Context, fs: ShipyardFileSystem
) -> None:
    _corrupt(committed, _entry_digest(committed, "labels.csv"), at=3)
    url = f"shipyard://{P}/ds@v1/labels.csv"
    with pytest.raises(IntegrityError, match=r"labels.csv is corrupted") as err, fs.open(url) as fh:
        fh.read()
    assert err.value.details["path"] == url
    with pytest.raises(IntegrityError, match=r"labels.csv"):
        fs.cat_file(url)


def test_a_corrupted_blob_fails_a_ranged_read_and_pandas(committed: Context) -> None:
    path = "tables/part-0.parquet"
    _corrupt(committed, _entry_digest(committed, path), at=1000)
    fs = ShipyardFileSystem()
    url = f"{P}/ds@v1/{path}"
    with pytest.raises(IntegrityError, match=r"part-0.parquet is corrupted"), fs.open(url) as fh:
        fh.seek(-8, io.SEEK_END)  # a jump: the whole blob is verified first
        fh.read()
    with pytest.raises(IntegrityError, match=r"part-0.parquet"):
        pq.read_table(f"{P}/ds@v1/{path}", filesystem=fs)
    pd = pytest.importorskip("pandas")
    with pytest.raises(IntegrityError, match=r"part-0.parquet"):
        pd.read_parquet(f"shipyard://{P}/ds@v1/{path}")


def test_sequential_policy_leaves_ranged_reads_unverified(committed: Context) -> None:
    _corrupt(committed, _entry_digest(committed, "labels.csv"), at=0)
    fs = ShipyardFileSystem(verify="sequential")
    with fs.open(f"{P}/ds@v1/labels.csv", "rb") as fh:
        fh.seek(9)
        assert fh.read(5) == b"1,cat"  # the jump is served as it is (documented)
    with pytest.raises(IntegrityError), fs.open(f"{P}/ds@v1/labels.csv", "rb") as fh:
        fh.read()  # a full sequential read still checks


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "error", "match"),
    [
        ("shipyard://", InvalidInputError, "names no project"),
        ("shipyard://Bad Project/ds/x", InvalidInputError, "project 'Bad Project'"),
        ("shipyard://default/ds@/x", InvalidInputError, "empty version"),
        ("shipyard://default/ds@v0/x", InvalidInputError, "not a version"),
        ("shipyard://default/ds@golden/x", DatasetPathNotFoundError, "no version or tag"),
        ("shipyard://default/ds@v9/labels.csv", DatasetPathNotFoundError, "no version 9"),
        ("shipyard://default/nope/labels.csv", DatasetPathNotFoundError, "'nope' does not exist"),
        ("shipyard://ghost/ds/labels.csv", DatasetPathNotFoundError, "ghost"),
        ("shipyard://default/ds@v1/missing.csv", DatasetPathNotFoundError, "has no such file"),
        ("shipyard://default/ds@v1/images", DatasetPathNotFoundError, "is a folder"),
        ("shipyard://default/ds@v1/../../etc/passwd", UnsafePathError, "'..'"),
        ("shipyard://default/ds@v1/images/../labels.csv", UnsafePathError, "'..'"),
        ("shipyard://default/ds@v1/%2e%2e/x", UnsafePathError, "percent"),
        ("shipyard://default", InvalidInputError, "names a project"),
    ],
)
def test_bad_urls_get_clear_errors(
    committed: Context, url: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match), fsspec.open(url, "rb") as fh:
        fh.read()


def test_not_found_is_a_file_not_found_error_for_fsspec_users(committed: Context) -> None:
    pd = pytest.importorskip("pandas")
    with pytest.raises(FileNotFoundError, match="no version 4"):
        pd.read_csv(f"shipyard://{P}/ds@v4/labels.csv")


def test_writes_are_refused(fs: ShipyardFileSystem, committed: Context) -> None:
    url = f"shipyard://{P}/ds@v1/new.txt"
    refused = pytest.raises(ReadOnlyError, match=r"read-only.*commit a new version")
    with refused, fsspec.open(url, "wb") as fh:
        fh.write(b"x")
    for attempt in (
        lambda: fs.pipe_file(url, b"x"),
        lambda: fs.rm(f"{P}/ds@v1/labels.csv"),
        lambda: fs.mkdir(f"{P}/ds@v1/new"),
        lambda: fs.mv(f"{P}/ds@v1/labels.csv", f"{P}/ds@v1/l.csv"),
        lambda: fs.touch(url),
    ):
        with pytest.raises(PermissionError, match="read-only"):
            attempt()
    assert fs.cat_file(f"{P}/ds@v1/labels.csv") == b"id,label\n1,cat\n2,dog\n"


def test_parse_location() -> None:
    loc = parse_location("shipyard://p/d@v3/a/b.parquet")
    assert (loc.project, loc.dataset, loc.ref, loc.path) == ("p", "d", "v3", "a/b.parquet")
    assert parse_location("p/d/").ref is None
    assert parse_location("p").dataset is None


# --- registration -------------------------------------------------------------------------------


def test_the_protocol_is_an_installed_fsspec_entry_point(home_env: Path) -> None:
    points = importlib.metadata.entry_points(group="fsspec.specs")
    assert "shipyard.data.fs:ShipyardFileSystem" in {
        p.value for p in points if p.name == "shipyard"
    }
    # a fresh interpreter that never imports shipyard itself still resolves the protocol
    code = (
        "import fsspec, sys; cls = fsspec.get_filesystem_class('shipyard'); "
        "print(cls.__module__, 'shipyard.data.fs' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["shipyard.data.fs", "True"]
