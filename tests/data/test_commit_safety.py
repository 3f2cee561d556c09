"""Commits that must be refused cleanly: a corrupted blob, a single file that is a symlink out of
its folder or a hard link, a full or read-only disk. Each leaves the store as it was."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.blobs import hash_bytes
from shipyard.context import Context, open_context
from shipyard.data import datasets
from shipyard.domain.models import FileEntry
from shipyard.errors import (
    ConflictError,
    StorageFullError,
    StorageUnavailableError,
    UnsafePathError,
)
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.mounts import fill, remount_read_only, tmpfs

P = "default"


def versions(ctx: Context, name: str) -> list[int]:
    try:
        return [v.version for v in datasets.list_versions(ctx, project=P, name=name)]
    except Exception:
        return []


# --- a corrupted blob ---------------------------------------------------------------------------


def test_a_commit_referencing_a_corrupted_blob_is_a_409_naming_it(ctx: Context) -> None:
    good = ctx.blobs.put_bytes(b"fine content")
    data = b"content that will rot on disk"
    bad = ctx.blobs.put_bytes(data)
    Path(ctx.blobs._path(bad.digest)).write_bytes(b"rotten content here, same size!"[: len(data)])
    files = [
        FileEntry(path="a.txt", digest=good.digest, size=good.size),
        FileEntry(path="b.txt", digest=bad.digest, size=bad.size),
    ]

    with pytest.raises(ConflictError) as caught:
        datasets.commit_files(ctx, project=P, name="ds", files=files)

    error = caught.value
    assert error.http_status == 409 and error.field == "files[1].digest"
    assert bad.digest in error.message and "'b.txt'" in error.message
    assert error.details == {"digest": bad.digest, "path": "b.txt"}
    assert versions(ctx, "ds") == []  # nothing committed
    # moved aside, so the next upload of the content stores it whole and the retry succeeds
    assert not ctx.blobs.exists(bad.digest)
    assert ctx.blobs.put_bytes(data).created
    version = datasets.commit_files(ctx, project=P, name="ds", files=files)
    assert version.version == 1
    assert ctx.blobs.get_bytes(bad.digest) == data


def test_a_corrupted_table_blob_is_a_409_too_not_a_500(ctx: Context) -> None:
    data = b"a,b\n1,2\n3,4\n"
    put = ctx.blobs.put_bytes(data)
    Path(ctx.blobs._path(put.digest)).write_bytes(b"a,b\n1,2\n3,5\n")
    files = [FileEntry(path="t.csv", digest=put.digest, size=put.size)]
    with pytest.raises(ConflictError) as caught:
        datasets.commit_files(ctx, project=P, name="ds", files=files)
    assert caught.value.field == "files[0].digest" and put.digest in caught.value.message
    assert versions(ctx, "ds") == []


# --- a single file: symlinks and hard links -----------------------------------------------------


def test_a_single_file_symlink_out_of_its_folder_is_refused(ctx: Context, tmp_path: Path) -> None:
    secret = tmp_path / "secret" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "innocent.csv").symlink_to(secret)

    with pytest.raises(UnsafePathError) as caught:
        datasets.commit_directory(ctx, project=P, name="ds", source=folder / "innocent.csv")
    assert caught.value.field == "source" and "innocent.csv" in caught.value.message
    assert versions(ctx, "ds") == []
    assert not ctx.blobs.exists(hash_bytes(b"PRIVATE KEY"))  # not a byte of it was stored


def test_a_single_file_symlink_inside_its_folder_is_followed(ctx: Context, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "real.csv").write_text("a\n1\n")
    (folder / "alias.csv").symlink_to(folder / "real.csv")
    version = datasets.commit_directory(ctx, project=P, name="ds", source=folder / "alias.csv")
    [entry] = datasets.list_files(ctx, project=P, name="ds", version=version.version)
    assert entry.path == "alias.csv" and entry.digest == hash_bytes(b"a\n1\n")


@pytest.mark.parametrize("single", [True, False], ids=["single-file", "in-a-folder"])
def test_a_hard_link_is_refused(ctx: Context, tmp_path: Path, single: bool) -> None:
    secret = tmp_path / "elsewhere" / "shadow"
    secret.parent.mkdir()
    secret.write_text("outside content")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    os.link(secret, folder / "notes.txt")

    source = folder / "notes.txt" if single else folder
    with pytest.raises(UnsafePathError) as caught:
        datasets.commit_directory(ctx, project=P, name="ds", source=source)
    assert caught.value.field == "source"
    assert "notes.txt" in caught.value.message and "hard link" in caught.value.message
    assert "copy" in caught.value.message
    assert versions(ctx, "ds") == []
    assert not ctx.blobs.exists(hash_bytes(b"outside content"))


# --- a full or read-only disk -------------------------------------------------------------------


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[tuple[Context, Path]]:
    with tmpfs(tmp_path / "disk", size_kb=4096) as disk:
        settings = Settings(home=disk / "home")
        context = open_context(settings, actor="tester")
        try:
            yield context, disk
        finally:
            context.db.close()
            forget_database(settings.database_url)


def test_a_commit_on_a_full_disk_is_a_507_and_reads_still_work(
    small_home: tuple[Context, Path], tmp_path: Path
) -> None:
    ctx, disk = small_home
    first = tmp_path / "first"
    first.mkdir()
    (first / "t.csv").write_text("a,b\n1,2\n")
    datasets.commit_directory(ctx, project=P, name="ds", source=first)
    second = tmp_path / "second"
    second.mkdir()
    (second / "big.bin").write_bytes(os.urandom(512 * 1024))
    fill(disk)

    with pytest.raises(StorageFullError) as caught:
        datasets.commit_directory(ctx, project=P, name="ds", source=second)
    assert caught.value.http_status == 507

    assert versions(ctx, "ds") == [1]
    assert [f.path for f in datasets.list_files(ctx, project=P, name="ds")] == ["t.csv"]
    assert datasets.read_table(ctx, project=P, name="ds", version=1, path="t.csv").num_rows == 1
    assert list((Path(ctx.blobs.root) / "tmp").iterdir()) == []


def test_a_commit_on_a_read_only_blob_folder_is_a_503(tmp_path: Path) -> None:
    # the database in the (writable) home, the blobs on a tmpfs that turns read-only
    with tmpfs(tmp_path / "disk", size_kb=1024) as disk:
        settings = Settings(home=tmp_path / "home", blobs_url=f"file://{disk / 'blobs'}")
        ctx = open_context(settings, actor="tester")
        try:
            (tmp_path / "src").mkdir()
            (tmp_path / "src" / "f.txt").write_text("x")
            datasets.commit_directory(ctx, project=P, name="ds", source=tmp_path / "src")
            remount_read_only(disk)
            (tmp_path / "src" / "g.txt").write_text("y")
            with pytest.raises(StorageUnavailableError) as caught:
                datasets.commit_directory(ctx, project=P, name="ds", source=tmp_path / "src")
            assert caught.value.http_status == 503 and "read-only" in caught.value.message
            assert versions(ctx, "ds") == [1]
            assert [f.path for f in datasets.list_files(ctx, project=P, name="ds")] == ["f.txt"]
        finally:
            ctx.db.close()
            forget_database(settings.database_url)
