"""The datasets service on a real SQLite home and a real blob folder, with real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from shipyard.blobs import hash_file
from shipyard.context import Context
from shipyard.data import datasets
from shipyard.domain.models import FileEntry
from shipyard.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ShipyardError,
    UnsafePathError,
)
from shipyard.security import audit
from tests.data.conftest import BOTH_DATABASES
from tests.domain.cases import UNSAFE_PATHS

P = "default"
SPECIES = np.array(["setosa", "versicolor", "virginica"])


@pytest.fixture(scope="module")
def digits() -> pa.Table:
    bunch = load_digits()
    columns = {f"pixel_{i}": bunch.data[:, i] for i in range(bunch.data.shape[1])}
    columns["target"] = bunch.target
    return pa.table(columns)


@pytest.fixture
def flowers() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 150
    length = rng.normal(5.8, 0.8, n).round(2)
    width = rng.normal(3.0, 0.4, n).round(2)
    width_missing = rng.random(n) < 0.1
    return {
        "sepal_length": length,
        "sepal_width": np.where(width_missing, np.nan, width),
        "species": SPECIES[rng.integers(0, 3, n)],
    }


@pytest.fixture
def source(tmp_path: Path, digits: pa.Table, flowers: dict[str, np.ndarray]) -> Path:
    root = tmp_path / "source"
    (root / "tables").mkdir(parents=True)
    (root / "images" / "raw").mkdir(parents=True)
    pq.write_table(digits, root / "tables" / "digits.parquet")
    lines = ["sepal_length,sepal_width,species"]
    for length, width, species in zip(*flowers.values(), strict=True):
        lines.append(f"{length},{'' if np.isnan(width) else width},{species}")
    (root / "tables" / "flowers.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(1)
    (root / "images" / "raw" / "a.bin").write_bytes(rng.bytes(40_000))
    (root / "images" / "raw" / "b.bin").write_bytes(rng.bytes(30_000))
    (root / "images" / "copy-of-a.bin").write_bytes((root / "images/raw/a.bin").read_bytes())
    (root / "README.txt").write_text("digits and flowers\n")
    return root


def blob_digests(ctx: Context) -> set[str]:
    """Every stored digest, loose or packed."""
    return {b.digest for b in ctx.blobs.iter_blobs()}


def snapshot(ctx: Context, name: str = "ds") -> tuple[list[Any], set[str]]:
    try:
        versions = datasets.list_versions(ctx, project=P, name=name)
    except NotFoundError:
        versions = []
    return versions, blob_digests(ctx)


def disk_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def put(ctx: Context, data: bytes, path: str) -> FileEntry:
    result = ctx.blobs.put_bytes(data)
    return FileEntry(path=path, digest=result.digest, size=result.size)


# --- commits ------------------------------------------------------------------------------------


@BOTH_DATABASES
def test_commit_directory_records_manifest_profile_and_validation(
    ctx: Context, source: Path, digits: pa.Table, flowers: dict[str, np.ndarray]
) -> None:
    calls: list[tuple[int, int, str]] = []
    version = datasets.commit_directory(
        ctx,
        project=P,
        name="ds",
        source=source,
        message="first",
        progress=lambda done, total, path: calls.append((done, total, path)),
    )
    on_disk = disk_files(source)
    sizes = {p: len(b) for p, b in on_disk.items()}

    assert version.version == 1
    assert version.message == "first" and version.created_by == "tester"
    assert version.file_count == len(on_disk) == 6
    assert version.total_bytes == sum(sizes.values())
    assert version.new_bytes == version.total_bytes - sizes["images/copy-of-a.bin"]
    files = datasets.list_files(ctx, project=P, name="ds", version=1)
    assert [f.path for f in files] == sorted(on_disk)
    for f in files:
        assert f.size == sizes[f.path]
        assert f.digest == hash_file(source / f.path)
    assert [c[2] for c in calls] == sorted(on_disk)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert calls[-1][:2] == (version.total_bytes, version.total_bytes)

    manifest = pq.read_table(pa.BufferReader(ctx.blobs.get_bytes(version.manifest_digest)))
    assert manifest.column_names == ["path", "digest", "size"]
    assert manifest.column("path").to_pylist() == sorted(on_disk)

    profile = version.profile
    assert (profile.files, profile.bytes) == (6, version.total_bytes)
    tables = {t.path: t for t in profile.tables}
    assert set(tables) == {"tables/digits.parquet", "tables/flowers.csv"}
    digits_profile = tables["tables/digits.parquet"]
    assert digits_profile.rows == 1797 == digits.num_rows
    target = digits.column("target").to_numpy()
    col = {c.name: c for c in digits_profile.columns}["target"]
    assert (col.type, col.count, col.nulls) == ("int64", 1797, 0)
    assert (col.min, col.max) == (float(target.min()), float(target.max())) == (0.0, 9.0)
    assert col.mean == pytest.approx(float(np.mean(target)))
    assert col.std == pytest.approx(float(np.std(target)))
    pixel = {c.name: c for c in digits_profile.columns}["pixel_36"]
    values = digits.column("pixel_36").to_numpy()
    assert (pixel.min, pixel.max) == (float(values.min()), float(values.max()))
    assert pixel.mean == pytest.approx(float(values.mean()))

    flower_cols = {c.name: c for c in tables["tables/flowers.csv"].columns}
    assert tables["tables/flowers.csv"].rows == 150
    width = flowers["sepal_width"]
    assert flower_cols["sepal_width"].nulls == int(np.isnan(width).sum()) > 0
    assert flower_cols["sepal_width"].count == int((~np.isnan(width)).sum())
    assert flower_cols["sepal_width"].mean == pytest.approx(float(np.nanmean(width)))
    assert flower_cols["sepal_width"].std == pytest.approx(float(np.nanstd(width)))
    assert flower_cols["species"].type == "string"
    assert flower_cols["species"].distinct == len(set(flowers["species"])) == 3
    assert flower_cols["species"].min is None

    checks = {v.check: v for v in version.validation}
    for path in tables:
        for check in ("readable", "non_empty", "no_all_null_columns"):
            assert checks[f"{check}:{path}"].passed, checks[f"{check}:{path}"].message
    assert len(checks) == 6

    with ctx.db.read() as s:
        events = [e for e in audit.list_events(s) if e.action == "dataset.commit"]
        assert audit.verify_chain(s) is None
    assert [e.resource for e in events] == [f"project/{P}/dataset/ds/version/1"]
    assert events[0].actor == "tester" and events[0].details["version_id"] == version.id


@BOTH_DATABASES
def test_committing_the_same_content_again_is_idempotent(ctx: Context, source: Path) -> None:
    first = datasets.commit_directory(ctx, project=P, name="ds", source=source)
    stored = blob_digests(ctx)

    again = datasets.commit_directory(ctx, project=P, name="ds", source=source, message="again")
    entries = datasets.list_files(ctx, project=P, name="ds")
    via_manifest = datasets.commit_files(ctx, project=P, name="ds", files=entries[::-1])

    assert again == first and via_manifest == first
    assert blob_digests(ctx) == stored
    assert [v.version for v in datasets.list_versions(ctx, project=P, name="ds")] == [1]


@BOTH_DATABASES
def test_second_version_shares_blobs_and_diffs(ctx: Context, source: Path) -> None:
    v1 = datasets.commit_directory(ctx, project=P, name="ds", source=source)
    (source / "README.txt").write_text("digits and flowers, revised\n")
    (source / "images" / "raw" / "b.bin").unlink()
    (source / "images" / "raw" / "c.bin").write_bytes(b"c" * 5000)

    v2 = datasets.commit_directory(ctx, project=P, name="ds", source=source)

    assert v2.version == 2 and v2.id != v1.id
    assert v2.new_bytes == len(b"digits and flowers, revised\n") + 5000
    assert v2.new_bytes < v2.total_bytes
    assert v2.total_bytes == sum(len(b) for b in disk_files(source).values())
    assert {t.path for t in v2.profile.tables} == {t.path for t in v1.profile.tables}
    assert v2.profile.tables == v1.profile.tables
    assert datasets.diff_versions(ctx, project=P, name="ds", a=1, b="v2") == {
        "added": ["images/raw/c.bin"],
        "removed": ["images/raw/b.bin"],
        "modified": ["README.txt"],
    }
    assert datasets.diff_versions(ctx, project=P, name="ds", a="2", b="latest") == {
        "added": [],
        "removed": [],
        "modified": [],
    }
    for ref in (1, "1", "v1"):
        assert datasets.get_version(ctx, project=P, name="ds", version=ref) == v1
    for latest in (2, "v2", None, "latest"):
        assert datasets.get_version(ctx, project=P, name="ds", version=latest) == v2
    assert datasets.list_versions(ctx, project=P, name="ds") == [v1, v2]

    datasets.commit_directory(ctx, project=P, name="other", source=source / "images")
    listed = datasets.list_datasets(ctx, project=P)
    assert [(d.name, d.latest_version) for d in listed] == [("ds", 2), ("other", 1)]
    assert datasets.get_dataset(ctx, project=P, name="ds") == listed[0]


def test_single_file_source_is_committed_under_its_name(ctx: Context, source: Path) -> None:
    version = datasets.commit_directory(
        ctx, project=P, name="one", source=source / "tables" / "flowers.csv"
    )
    files = datasets.list_files(ctx, project=P, name="one", version=version.version)
    assert [(f.path, f.digest) for f in files] == [
        ("flowers.csv", hash_file(source / "tables" / "flowers.csv"))
    ]
    assert [t.rows for t in version.profile.tables] == [150]


def test_failed_checks_are_recorded_without_blocking_the_commit(
    ctx: Context, tmp_path: Path
) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "header_only.csv").write_text("a,b\n")
    (root / "half_empty.csv").write_text("a,b\n1,\n2,\n")
    (root / "broken.parquet").write_bytes(b"this is not parquet at all")

    version = datasets.commit_directory(ctx, project=P, name="bad", source=root)

    checks = {v.check: v for v in version.validation}
    assert not checks["readable:broken.parquet"].passed
    assert "cannot be read" in checks["readable:broken.parquet"].message
    assert "non_empty:broken.parquet" not in checks
    assert checks["readable:header_only.csv"].passed
    assert not checks["non_empty:header_only.csv"].passed
    assert checks["non_empty:half_empty.csv"].passed
    assert not checks["no_all_null_columns:half_empty.csv"].passed
    assert checks["no_all_null_columns:half_empty.csv"].message.endswith(": b")
    assert {t.path for t in version.profile.tables} == {"header_only.csv", "half_empty.csv"}
    assert datasets.get_version(ctx, project=P, name="bad") == version


# --- reading back ----------------------------------------------------------------------------


def test_checkout_writes_byte_identical_files(ctx: Context, source: Path, tmp_path: Path) -> None:
    original = disk_files(source)
    datasets.commit_directory(ctx, project=P, name="ds", source=source)
    (source / "README.txt").unlink()
    datasets.commit_directory(ctx, project=P, name="ds", source=source)
    calls: list[tuple[int, int, str]] = []

    out = datasets.checkout(
        ctx,
        project=P,
        name="ds",
        version="v1",
        dest=tmp_path / "out" / "v1",
        progress=lambda *args: calls.append(args),
    )
    latest = datasets.checkout(ctx, project=P, name="ds", version=None, dest=tmp_path / "v2")

    assert disk_files(out) == original
    assert disk_files(latest) == {p: b for p, b in original.items() if p != "README.txt"}
    assert calls[-1][0] == calls[-1][1] == sum(len(b) for b in original.values())


def test_checkout_refuses_a_symlink_in_dest_pointing_out(
    ctx: Context, source: Path, tmp_path: Path
) -> None:
    datasets.commit_directory(ctx, project=P, name="ds", source=source)
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tables").symlink_to(outside, target_is_directory=True)

    with pytest.raises(UnsafePathError) as err:
        datasets.checkout(ctx, project=P, name="ds", version=1, dest=dest)
    assert err.value.field == "path" and "tables/" in err.value.message
    assert list(outside.iterdir()) == []


def test_checkout_detects_a_corrupted_blob(ctx: Context, source: Path, tmp_path: Path) -> None:
    version = datasets.commit_directory(ctx, project=P, name="ds", source=source)
    entry = next(
        f
        for f in datasets.list_files(ctx, project=P, name="ds", version=version.version)
        if f.path == "README.txt"
    )
    blob = Path(ctx.blobs.root) / entry.digest[:2] / entry.digest[2:4] / entry.digest
    blob.chmod(0o644)
    blob.write_bytes(b"tampered!\n")

    with pytest.raises(IntegrityError):
        datasets.checkout(ctx, project=P, name="ds", version=1, dest=tmp_path / "out")
    assert not (tmp_path / "out" / "README.txt").exists()


def test_read_table_loads_parquet_and_csv(
    ctx: Context, source: Path, digits: pa.Table, flowers: dict[str, np.ndarray]
) -> None:
    datasets.commit_directory(ctx, project=P, name="ds", source=source)

    table = datasets.read_table(ctx, project=P, name="ds", version=1, path="tables/digits.parquet")
    csv = datasets.read_table(
        ctx, project=P, name="ds", version="latest", path="tables/flowers.csv"
    )

    assert table.equals(digits)
    assert csv.equals(pa_csv.read_csv(source / "tables" / "flowers.csv"))
    assert csv.column("species").to_pylist() == list(flowers["species"])
    with pytest.raises(InvalidInputError) as err:
        datasets.read_table(ctx, project=P, name="ds", version=1, path="README.txt")
    assert err.value.field == "path"
    with pytest.raises(NotFoundError) as missing:
        datasets.read_table(ctx, project=P, name="ds", version=1, path="tables/nope.csv")
    assert missing.value.field == "path" and "tables/nope.csv" in missing.value.message
    with pytest.raises(UnsafePathError) as unsafe:
        datasets.read_table(ctx, project=P, name="ds", version=1, path="../tables/digits.parquet")
    assert unsafe.value.field == "path"


# --- bad input leaves the store unchanged ------------------------------------------------------


@pytest.fixture
def committed(ctx: Context, source: Path) -> tuple[list[Any], set[str]]:
    datasets.commit_directory(ctx, project=P, name="ds", source=source)
    return snapshot(ctx)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", "-x", "a b", "x" * 129, "ds\x00"])
def test_invalid_dataset_names_are_refused(
    ctx: Context, source: Path, committed: tuple[list[Any], set[str]], name: str
) -> None:
    with pytest.raises(InvalidInputError) as err:
        datasets.commit_directory(ctx, project=P, name=name, source=source)
    assert err.value.field == "name"
    entry = put(ctx, b"payload", "x.txt")
    stored = blob_digests(ctx)
    with pytest.raises(InvalidInputError) as err:
        datasets.commit_files(ctx, project=P, name=name, files=[entry])
    assert err.value.field == "name"
    with pytest.raises(InvalidInputError) as err:
        datasets.commit_files(ctx, project=name, name="ds", files=[entry])
    assert err.value.field == "project"
    with pytest.raises(InvalidInputError) as err:
        datasets.get_dataset(ctx, project=P, name=name)
    assert err.value.field == "name"
    assert snapshot(ctx) == (committed[0], stored)


@pytest.mark.parametrize(
    "path", [value for _, value in UNSAFE_PATHS], ids=[i for i, _ in UNSAFE_PATHS]
)
def test_unsafe_file_paths_are_refused(
    ctx: Context, committed: tuple[list[Any], set[str]], path: str
) -> None:
    good = put(ctx, b"good", "good.txt")
    bad = put(ctx, b"bad", "placeholder").model_copy(update={"path": path})
    stored = blob_digests(ctx)

    with pytest.raises(UnsafePathError) as err:
        datasets.commit_files(ctx, project=P, name="ds", files=[good, bad])

    assert err.value.field == "files[1].path"
    assert repr(path) in err.value.message
    assert snapshot(ctx) == (committed[0], stored)


@BOTH_DATABASES
def test_bad_manifests_are_refused_naming_the_field(
    ctx: Context, committed: tuple[list[Any], set[str]]
) -> None:
    a = put(ctx, b"alpha", "a.txt")
    b = put(ctx, b"beta", "b.txt")
    stored = blob_digests(ctx)
    missing = "0" * 64
    cases: list[tuple[list[FileEntry], type[ShipyardError], str]] = [
        ([], InvalidInputError, "files"),
        ([a, b.model_copy(update={"path": "a.txt"})], InvalidInputError, "files[1].path"),
        (
            [a.model_copy(update={"path": "d"}), b.model_copy(update={"path": "d/b"})],
            InvalidInputError,
            "files[0].path",
        ),
        ([a, b.model_copy(update={"digest": missing})], NotFoundError, "files[1].digest"),
        ([a.model_copy(update={"digest": "../../etc"})], InvalidInputError, "files[0].digest"),
        ([a, b.model_copy(update={"size": b.size + 1})], InvalidInputError, "files[1].size"),
        ([a.model_copy(update={"size": -1})], InvalidInputError, "files[0].size"),
    ]
    for files, error, field in cases:
        with pytest.raises(error) as err:
            datasets.commit_files(ctx, project=P, name="ds", files=files)
        assert err.value.field == field, (files, err.value)
    assert snapshot(ctx) == (committed[0], stored)


def test_symlink_pointing_out_of_the_source_is_refused(
    ctx: Context, source: Path, tmp_path: Path, committed: tuple[list[Any], set[str]]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not commit me")
    (source / "images" / "evil.txt").symlink_to(secret)
    (source / "zz-new.txt").write_text("new content that must not be stored")

    with pytest.raises(UnsafePathError) as err:
        datasets.commit_directory(ctx, project=P, name="ds", source=source)
    assert err.value.field == "source" and "images/evil.txt" in err.value.message

    (source / "images" / "evil.txt").unlink()
    (source / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UnsafePathError) as err:
        datasets.commit_directory(ctx, project=P, name="ds", source=source)
    assert err.value.field == "source" and "linked" in err.value.message
    assert snapshot(ctx) == committed


def test_symlink_inside_the_source_is_followed(ctx: Context, source: Path) -> None:
    (source / "alias.csv").symlink_to(source / "tables" / "flowers.csv")
    version = datasets.commit_directory(ctx, project=P, name="ds", source=source)
    files = {f.path: f.digest for f in datasets.list_files(ctx, project=P, name="ds", version=1)}
    assert files["alias.csv"] == files["tables/flowers.csv"]
    assert version.file_count == 7


def test_missing_or_empty_source_is_refused(
    ctx: Context, tmp_path: Path, committed: tuple[list[Any], set[str]]
) -> None:
    with pytest.raises(NotFoundError) as err:
        datasets.commit_directory(ctx, project=P, name="ds", source=tmp_path / "nowhere")
    assert err.value.field == "source" and "nowhere" in err.value.message
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError) as empty:
        datasets.commit_directory(ctx, project=P, name="ds", source=tmp_path / "empty")
    assert empty.value.field == "source"
    assert snapshot(ctx) == committed


@BOTH_DATABASES
def test_unknown_dataset_version_or_project_is_not_found(
    ctx: Context, tmp_path: Path, committed: tuple[list[Any], set[str]]
) -> None:
    reads: list[Callable[..., object]] = [
        lambda **kw: datasets.get_dataset(ctx, **kw),
        lambda **kw: datasets.list_versions(ctx, **kw),
        lambda **kw: datasets.get_version(ctx, **kw),
        lambda **kw: datasets.list_files(ctx, version=1, **kw),
        lambda **kw: datasets.checkout(ctx, version=1, dest=tmp_path / "out", **kw),
    ]
    for read in reads:
        with pytest.raises(NotFoundError) as err:
            read(project=P, name="nope")
        assert err.value.field == "name" and "'nope'" in err.value.message
        with pytest.raises(NotFoundError) as err:
            read(project="elsewhere", name="ds")
        assert err.value.field == "project" and "'elsewhere'" in err.value.message
    with pytest.raises(NotFoundError) as err:
        datasets.list_datasets(ctx, project="elsewhere")
    assert err.value.field == "project"

    for ref in (9, "v9"):
        with pytest.raises(NotFoundError) as err:
            datasets.get_version(ctx, project=P, name="ds", version=ref)
        assert err.value.field == "version" and "9" in err.value.message
    with pytest.raises(NotFoundError) as err:
        datasets.diff_versions(ctx, project=P, name="ds", a=1, b=2)
    assert err.value.field == "version"
    for bad in (0, -1, True, "v0", "latest!", "../v1", ""):
        with pytest.raises(InvalidInputError) as invalid:
            datasets.get_version(ctx, project=P, name="ds", version=bad)
        assert invalid.value.field == "version"
    for tag in ("x", "v", "1.5", "v01x"):  # names: read as tags, and there are none
        with pytest.raises(NotFoundError, match=f"no version or tag {tag!r}") as err:
            datasets.get_version(ctx, project=P, name="ds", version=tag)
        assert err.value.field == "version"
    assert not (tmp_path / "out").exists()
    assert snapshot(ctx) == committed


# --- crash safety ---------------------------------------------------------------------------------

_COMMIT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from shipyard.context import open_context
    from shipyard.data.datasets import commit_directory
    from shipyard.settings import Settings

    def progress(done, total, path):
        print(path, flush=True)
        time.sleep(0.02)  # slow enough that the parent can kill it mid-upload

    ctx = open_context(Settings.from_env())
    commit_directory(ctx, project="default", name="big", source=Path(sys.argv[1]),
                     progress=progress)
    print("DONE", flush=True)
    """
)


def test_a_commit_killed_mid_way_leaves_the_store_consistent(
    ctx: Context, home: Path, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    (small / "first.txt").write_text("version one\n")
    datasets.commit_directory(ctx, project=P, name="big", source=small)
    before = snapshot(ctx, "big")

    big = tmp_path / "big"
    rng = np.random.default_rng(3)
    for i in range(200):
        folder = big / f"part-{i // 50}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"shard-{i:03d}.bin").write_bytes(rng.bytes(250_000))

    env = {**os.environ, "SHIPYARD_HOME": str(home)}
    env.pop("SHIPYARD_URL", None)
    env.pop("SHIPYARD_DB", None)
    if ctx.settings.db_url:
        env["SHIPYARD_DB"] = ctx.settings.db_url
    proc = subprocess.Popen(
        [sys.executable, "-c", _COMMIT_SCRIPT, str(big)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # the files are packed: killed after 20 were read into the pack being written
        assert proc.stdout is not None
        for _ in range(20):
            assert proc.stdout.readline(), proc.stderr.read().decode() if proc.stderr else ""
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
    assert proc.returncode == -signal.SIGKILL

    after_kill = snapshot(ctx, "big")
    assert after_kill[0] == before[0]
    assert before[1] <= after_kill[1] and len(after_kill[1]) < len(before[1]) + 200
    for digest in after_kill[1]:
        ctx.blobs.get_bytes(digest)
    with ctx.db.read() as s:
        assert audit.verify_chain(s) is None
    tmp = Path(ctx.blobs.root) / "tmp"
    assert [p.name[:5] for p in tmp.iterdir()] == ["pack-"]  # the pack it was writing, unseen
    assert ctx.blobs.sweep_temp(older_than_s=0) == 1

    version = datasets.commit_directory(ctx, project=P, name="big", source=big)
    assert version.version == 2 and version.file_count == 200
    out = datasets.checkout(ctx, project=P, name="big", version=2, dest=tmp_path / "out")
    assert disk_files(out) == disk_files(big)
    assert [v.version for v in datasets.list_versions(ctx, project=P, name="big")] == [1, 2]


@BOTH_DATABASES
def test_a_commit_racing_another_writer_bases_itself_on_the_winner(ctx: Context) -> None:
    shared = put(ctx, b"shared content", "shared.txt")
    mine = [shared, put(ctx, b"mine", "mine.txt")]
    theirs = [shared, put(ctx, b"theirs!", "theirs.txt")]
    raced: list[Any] = []

    def race(done: int, total: int, path: str) -> None:
        if not raced:
            raced.append(datasets.commit_files(ctx, project=P, name="ds", files=theirs))

    version = datasets.commit_files(ctx, project=P, name="ds", files=mine, progress=race)

    assert [v.version for v in datasets.list_versions(ctx, project=P, name="ds")] == [1, 2]
    assert raced[0].version == 1 and version.version == 2
    assert version.new_bytes == len(b"mine")
    assert datasets.diff_versions(ctx, project=P, name="ds", a=1, b=2) == {
        "added": ["mine.txt"],
        "removed": ["theirs.txt"],
        "modified": [],
    }

    def race_identical(done: int, total: int, path: str) -> None:
        if not raced:
            raced.append(datasets.commit_files(ctx, project=P, name="ds", files=theirs))

    raced.clear()
    again = datasets.commit_files(ctx, project=P, name="ds", files=theirs, progress=race_identical)
    assert again == raced[0] and again.version == 3
    assert len(datasets.list_versions(ctx, project=P, name="ds")) == 3


def test_profile_ignores_nan_and_decodes_dictionaries(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "edge"
    root.mkdir()
    table = pa.table(
        {
            "x": pa.array([1.0, float("nan"), 3.0, None, 8.0]),
            "all_nan": pa.array([float("nan")] * 5),
            "label": pa.array(["b", "a", None, "b", "c"]).dictionary_encode(),
            "when": pa.array([1, 2, 3, 4, 5], pa.timestamp("ms")),
        }
    )
    pq.write_table(table, root / "edge.parquet")

    version = datasets.commit_directory(ctx, project=P, name="edge", source=root)

    cols = {c.name: c for c in version.profile.tables[0].columns}
    finite = np.array([1.0, 3.0, 8.0])
    assert (cols["x"].count, cols["x"].nulls) == (4, 1)
    assert (cols["x"].min, cols["x"].max) == (1.0, 8.0)
    assert cols["x"].mean == pytest.approx(finite.mean())
    assert cols["x"].std == pytest.approx(finite.std())
    assert cols["all_nan"].mean is None and cols["all_nan"].min is None
    assert (cols["label"].type, cols["label"].distinct, cols["label"].nulls) == ("string", 3, 1)
    assert cols["when"].type == "timestamp[ms]" and cols["when"].min is None
    assert all(v.passed for v in version.validation)
