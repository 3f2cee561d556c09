"""The content-addressed blob store on a local folder: dedup, atomic writes, verified reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shipyard.blobs import BlobStore, hash_bytes, hash_file, open_blobs
from shipyard.blobs.store import CHUNK
from shipyard.errors import IntegrityError, InvalidInputError, NotFoundError
from tests.conftest import wait_for


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def blobs(root: Path) -> BlobStore:
    return open_blobs(f"file://{root}")


def stored_files(root: Path) -> list[Path]:
    """The published blobs: every file but the temp folder's."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and "tmp" not in p.relative_to(root).parts
    )


def temp_files(root: Path) -> list[Path]:
    tmp = root / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def test_put_and_get_bytes(blobs: BlobStore, root: Path) -> None:
    data = b"hello shipyard\x00\xff" * 1000

    put = blobs.put_bytes(data)

    assert put.digest == hash_bytes(data) and put.size == len(data) and put.created
    assert blobs.exists(put.digest) and blobs.size(put.digest) == len(data)
    assert blobs.get_bytes(put.digest) == data
    assert b"".join(blobs.iter_chunks(put.digest)) == data
    with blobs.open(put.digest) as fh:
        assert fh.read() == data
    d = put.digest
    assert stored_files(root) == [root / d[:2] / d[2:4] / d]
    assert temp_files(root) == []


def test_put_and_copy_a_multi_chunk_file(blobs: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(CHUNK) * 2 + b"tail")

    put = blobs.put_file(source)

    assert put.digest == hash_file(source) and put.size == source.stat().st_size and put.created
    dest = tmp_path / "out" / "copy.bin"
    blobs.copy_to(put.digest, dest)
    assert dest.read_bytes() == source.read_bytes()
    assert len(list(blobs.iter_chunks(put.digest))) == 3


def test_the_same_content_is_stored_once(blobs: BlobStore, root: Path, tmp_path: Path) -> None:
    data = b"same content"
    source = tmp_path / "same.txt"
    source.write_bytes(data)

    first = blobs.put_bytes(data)
    again = blobs.put_bytes(data)
    from_file = blobs.put_file(source)
    other = blobs.put_bytes(b"other content")

    assert first.created and not again.created and not from_file.created and other.created
    assert first.digest == again.digest == from_file.digest != other.digest
    assert len(stored_files(root)) == 2
    assert temp_files(root) == []


def test_an_empty_blob(blobs: BlobStore) -> None:
    put = blobs.put_bytes(b"")
    assert blobs.get_bytes(put.digest) == b"" and blobs.size(put.digest) == 0


def test_a_writer_killed_mid_write_leaves_no_blob_only_a_temp_file(
    blobs: BlobStore, root: Path, tmp_path: Path
) -> None:
    """The writer streams from a pipe we control, so it is killed while provably mid-write."""
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    script = textwrap.dedent(
        """
        import sys
        from shipyard.blobs import open_blobs
        open_blobs(sys.argv[1]).put_file(sys.argv[2])
        print("published")
        """
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, blobs.url, str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    content = os.urandom(3 * CHUNK)
    try:
        fd = wait_for(lambda: _open_for_writing(fifo, writer), what="the writer to open the pipe")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as feed:
            feed.write(content[: 2 * CHUNK])
            feed.flush()
            wait_for(
                lambda: sum(p.stat().st_size for p in temp_files(root)) >= CHUNK,
                what="the writer to stream into its temp file",
            )
            writer.send_signal(signal.SIGKILL)
            assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()

    assert stored_files(root) == []
    assert not blobs.exists(hash_bytes(content))
    leftovers = temp_files(root)
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < len(content)

    assert blobs.sweep_temp() == 0  # too young: it could belong to a writer still running
    assert temp_files(root) == leftovers
    assert blobs.sweep_temp(older_than_s=0) == 1
    assert temp_files(root) == []
    assert blobs.sweep_temp(older_than_s=0) == 0


def _open_for_writing(fifo: Path, reader: subprocess.Popen[bytes]) -> int | None:
    """The pipe's write end once ``reader`` has opened the other (without blocking if it died)."""
    assert reader.poll() is None, reader.communicate()
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None


def test_sweep_keeps_young_temp_files_and_removes_old_ones(blobs: BlobStore, root: Path) -> None:
    blobs.put_bytes(b"x")
    young, old = root / "tmp" / "put-young", root / "tmp" / "put-old"
    young.write_bytes(b"partial")
    old.write_bytes(b"partial")
    os.utime(old, (1_000_000, 1_000_000))

    assert blobs.sweep_temp() == 1

    assert temp_files(root) == [young]
    assert len(stored_files(root)) == 1  # published blobs are never swept


def _corrupt_in_place(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


@pytest.mark.parametrize("damage", [_corrupt_in_place, _truncate], ids=["bitflip", "truncated"])
def test_a_corrupted_blob_is_an_integrity_error(
    blobs: BlobStore, root: Path, tmp_path: Path, damage: object
) -> None:
    data = os.urandom(CHUNK + 17)
    digest = blobs.put_bytes(data).digest
    damage(stored_files(root)[0])  # type: ignore[operator]

    for read in (
        lambda: blobs.get_bytes(digest),
        lambda: list(blobs.iter_chunks(digest)),
        lambda: blobs.copy_to(digest, tmp_path / "out" / "copy.bin"),
    ):
        with pytest.raises(IntegrityError) as caught:
            read()
        assert caught.value.field == "digest"
        assert digest in caught.value.message and "corrupted" in caught.value.message

    out = tmp_path / "out"
    assert list(out.iterdir()) == []  # copy_to left neither the copy nor its temp file


def test_putting_the_content_again_repairs_a_corrupted_blob(blobs: BlobStore, root: Path) -> None:
    data = b"precious" * 1000
    digest = blobs.put_bytes(data).digest
    _corrupt_in_place(stored_files(root)[0])

    again = blobs.put_bytes(data)

    assert again.created and again.digest == digest
    assert blobs.get_bytes(digest) == data


BAD_DIGESTS = [
    "",
    "abc",
    "A" * 64,  # upper case: not the canonical form
    "g" * 64,
    "0" * 63,
    "0" * 65,
    "../../../../etc/passwd".ljust(64, "0"),
    "00/" + "0" * 61,
    "0" * 63 + "\n",
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
@pytest.mark.parametrize("op", ["exists", "size", "get_bytes", "iter_chunks", "open", "copy_to"])
def test_an_invalid_digest_is_rejected_naming_the_field(
    blobs: BlobStore, tmp_path: Path, digest: str, op: str
) -> None:
    call = {
        "iter_chunks": lambda: list(blobs.iter_chunks(digest)),
        "copy_to": lambda: blobs.copy_to(digest, tmp_path / "copy"),
    }.get(op, lambda: getattr(blobs, op)(digest))
    with pytest.raises(InvalidInputError) as caught:
        call()
    assert type(caught.value) is InvalidInputError
    assert caught.value.field == "digest" and "digest" in caught.value.message


@pytest.mark.parametrize("op", ["size", "get_bytes", "iter_chunks", "open", "copy_to"])
def test_a_missing_blob_is_not_found(blobs: BlobStore, tmp_path: Path, op: str) -> None:
    blobs.put_bytes(b"something else")
    digest = hash_bytes(b"never stored")
    call = {
        "iter_chunks": lambda: list(blobs.iter_chunks(digest)),
        "copy_to": lambda: blobs.copy_to(digest, tmp_path / "copy"),
    }.get(op, lambda: getattr(blobs, op)(digest))

    assert not blobs.exists(digest)
    with pytest.raises(NotFoundError) as caught:
        call()
    assert caught.value.field == "digest" and digest in caught.value.message
    assert not (tmp_path / "copy").exists()
