"""The blob store on a disk that fills up or turns read-only (real tmpfs mounts), and the
maintenance primitives the garbage collector builds on."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.blobs import BlobStore, hash_bytes
from shipyard.blobs.store import check_blob_url
from shipyard.errors import (
    InvalidInputError,
    NotFoundError,
    StorageFullError,
    StorageUnavailableError,
)
from tests.mounts import fill, remount_read_only, tmpfs

OLD = 1_000_000.0  # an mtime long before any grace period


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", size_kb=512) as mounted:
        yield mounted


def leftovers(root: Path) -> list[Path]:
    tmp = root / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def test_a_full_disk_is_a_storage_full_error_and_leaves_nothing_behind(
    small_disk: Path, tmp_path: Path
) -> None:
    store = BlobStore(f"file://{small_disk / 'blobs'}")
    kept = store.put_bytes(b"stored before the disk filled").digest
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(256 * 1024))
    fill(small_disk)

    for put in (lambda: store.put_bytes(os.urandom(64 * 1024)), lambda: store.put_file(source)):
        with pytest.raises(StorageFullError) as caught:
            put()
        assert caught.value.http_status == 507 and caught.value.field == "storage"
        assert "no space left" in caught.value.message and "gc" in caught.value.message

    assert leftovers(small_disk / "blobs") == []  # the partial temp files were removed
    assert store.get_bytes(kept) == b"stored before the disk filled"  # reads still work
    assert store.put_bytes(b"stored before the disk filled").created is False  # dedup still works


def test_a_read_only_blob_folder_is_a_storage_unavailable_error(
    small_disk: Path, tmp_path: Path
) -> None:
    store = BlobStore(f"file://{small_disk / 'blobs'}")
    kept = store.put_bytes(b"written while writable").digest
    source = tmp_path / "new.bin"
    source.write_bytes(b"new content")
    remount_read_only(small_disk)

    for put in (lambda: store.put_bytes(b"more"), lambda: store.put_file(source)):
        with pytest.raises(StorageUnavailableError) as caught:
            put()
        assert caught.value.http_status == 503 and "read-only" in caught.value.message
    assert store.get_bytes(kept) == b"written while writable"
    assert store.sweep_temp(older_than_s=0) == 0  # best effort: no error on a read-only store


def test_an_unreadable_source_is_not_reported_as_a_broken_store(tmp_path: Path) -> None:
    store = BlobStore(f"file://{tmp_path / 'blobs'}")
    with pytest.raises(FileNotFoundError):
        store.put_file(tmp_path / "missing.bin")


def test_checkout_to_a_full_disk_is_a_storage_full_error(small_disk: Path, tmp_path: Path) -> None:
    store = BlobStore(f"file://{tmp_path / 'blobs'}")
    digest = store.put_bytes(os.urandom(128 * 1024)).digest
    fill(small_disk)
    with pytest.raises(StorageFullError) as caught:
        store.copy_to(digest, small_disk / "out" / "file.bin")
    assert str(small_disk / "out") in caught.value.message
    assert not (small_disk / "out" / "file.bin").exists()


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_s3fs_names_the_extra_to_install() -> None:
    for url in ("s3://bucket/prefix", "s3a://bucket"):
        with pytest.raises(InvalidInputError) as caught:
            BlobStore(url)
        assert caught.value.field == "blobs"
        assert "pip install 'shipyard[s3]'" in caught.value.message
    with pytest.raises(InvalidInputError) as caught:
        check_blob_url("nosuchscheme://x")
    assert caught.value.field == "blobs" and "nosuchscheme" in caught.value.message


def test_storing_existing_content_refreshes_its_age(tmp_path: Path) -> None:
    store = BlobStore(f"file://{tmp_path / 'blobs'}")
    data = b"an old orphan that a new commit reuses"
    digest = store.put_bytes(data).digest
    path = Path(store._path(digest))
    os.utime(path, (OLD, OLD))
    store.put_bytes(data)
    assert path.stat().st_mtime > time.time() - 60
    os.utime(path, (OLD, OLD))
    source = tmp_path / "f"
    source.write_bytes(data)
    store.put_file(source)
    assert path.stat().st_mtime > time.time() - 60
    os.utime(path, (OLD, OLD))
    store.touch(digest)
    assert path.stat().st_mtime > time.time() - 60


def test_iter_blobs_remove_and_quarantine(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = BlobStore(f"file://{root}")
    a, b = store.put_bytes(b"a").digest, store.put_bytes(b"b").digest
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp" / "put-x").write_bytes(b"partial")  # never listed as a blob
    (root / "ab").mkdir(exist_ok=True)
    (root / "ab" / "README").write_text("not a blob")

    assert sorted(x.digest for x in store.iter_blobs()) == sorted([a, b])
    assert {x.size for x in store.iter_blobs()} == {1}

    assert store.remove(a, unless_newer_than=OLD) is False  # modified after OLD: kept
    assert store.exists(a)
    assert store.remove(a) is True and not store.exists(a)
    assert store.remove(a) is False  # already gone

    assert store.quarantine(b) is True
    assert not store.exists(b)
    assert [p.name.split(".")[0] for p in (root / "quarantine").iterdir()] == [b]
    with pytest.raises(NotFoundError):
        store.get_bytes(b)
    assert store.put_bytes(b"b").created  # the next upload stores it whole again


def test_verify_tells_an_intact_blob_from_a_corrupted_one(tmp_path: Path) -> None:
    store = BlobStore(f"file://{tmp_path / 'blobs'}")
    digest = store.put_bytes(b"intact").digest
    assert store.verify(digest)
    Path(store._path(digest)).write_bytes(b"broken")
    assert not store.verify(digest)
    with pytest.raises(NotFoundError):
        store.verify(hash_bytes(b"never stored"))
