"""Packed and chunked blobs: every read of a digest works the same whether its blob is loose,
packed or chunked; a pack is published whole or not at all (kill -9 included); content already
stored is not written again; a changed region of a large file stores only its chunks; a file that
changes while it is stored is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import numpy as np
import pytest

from shipyard.blobs.chunking import CHUNKED_MIN_BYTES
from shipyard.blobs.packs import PACK_DIR
from shipyard.blobs.store import BlobStore, FileChangedError, SourceFile, hash_bytes
from shipyard.errors import IntegrityError, NotFoundError


def source(path: Path) -> SourceFile:
    info = os.stat(path)
    return SourceFile(path, info.st_size, info.st_mtime_ns, info.st_ctime_ns, shown=path.name)


def small_files(folder: Path, count: int, *, seed: int = 1) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"f{i:04d}.bin"
        path.write_bytes(rng.bytes(100 + i))
        paths.append(path)
    return paths


def packs(store: BlobStore) -> list[str]:
    folder = Path(store.root) / PACK_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(f"file://{tmp_path / 'blobs'}")


def test_many_small_files_go_into_one_pack_and_read_like_loose_blobs(
    store: BlobStore, tmp_path: Path
) -> None:
    paths = small_files(tmp_path / "src", 40)
    paths.append(tmp_path / "src" / "dup.bin")
    paths[-1].write_bytes(paths[0].read_bytes())  # the same content twice: stored once
    puts = store.put_files([source(p) for p in paths])

    assert [p.digest for p in puts] == [hash_bytes(p.read_bytes()) for p in paths]
    assert sum(p.created for p in puts) == 40 and len(packs(store)) == 1
    assert not list(Path(store.root).glob("??/??/*"))  # nothing loose
    for path, put in zip(paths, puts, strict=True):
        data = path.read_bytes()
        assert store.exists(put.digest) and store.size(put.digest) == len(data)
        assert store.get_bytes(put.digest) == data
        assert b"".join(store.iter_chunks(put.digest)) == data
        assert store.verify(put.digest)
        with store.open(put.digest) as fh:
            fh.seek(10)
            assert fh.read(5) == data[10:15]
    store.copy_to(puts[3].digest, tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == paths[3].read_bytes()
    listed = {b.digest: b for b in store.iter_blobs()}
    assert set(listed) == {p.digest for p in puts} and all(b.pack for b in listed.values())

    again = store.put_files([source(p) for p in paths])  # already stored: nothing written
    assert not any(p.created for p in again) and len(packs(store)) == 1
    # another process (a fresh store object) sees the pack too
    assert BlobStore(store.url).get_bytes(puts[7].digest) == paths[7].read_bytes()


def test_a_corrupted_packed_blob_is_an_integrity_error_and_put_repairs_it(
    store: BlobStore, tmp_path: Path
) -> None:
    paths = small_files(tmp_path / "src", 20)
    puts = store.put_files([source(p) for p in paths])
    [pack] = packs(store)
    pack_path = Path(store.root) / PACK_DIR / pack
    raw = bytearray(pack_path.read_bytes())
    at = raw.find(paths[5].read_bytes())
    raw[at] ^= 0xFF
    pack_path.chmod(0o600)
    pack_path.write_bytes(bytes(raw))

    digest = puts[5].digest
    with pytest.raises(IntegrityError):
        store.get_bytes(digest)
    with pytest.raises(IntegrityError):
        list(store.iter_chunks(digest))
    assert not store.verify(digest)
    assert store.get_bytes(puts[6].digest) == paths[6].read_bytes()  # its neighbours are fine
    assert store.put_bytes(paths[5].read_bytes()).created  # a loose copy, read first from now on
    assert store.get_bytes(digest) == paths[5].read_bytes()


_KILLED_PACK_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from shipyard.blobs.store import BlobStore, SourceFile

    store = BlobStore(sys.argv[1])
    files = []
    for path in sorted(Path(sys.argv[2]).iterdir()):
        info = os.stat(path)
        files.append(SourceFile(path, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    seen = []
    def progress(source):
        seen.append(source)
        if len(seen) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-pack, for real
    store.put_files(files, progress=progress)
    """
)


def test_a_writer_killed_mid_pack_leaves_the_store_readable_and_no_pack(
    store: BlobStore, tmp_path: Path
) -> None:
    before = store.put_bytes(b"stored before the crash").digest
    paths = small_files(tmp_path / "src", 60)
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_PACK_WRITER, store.url, str(tmp_path / "src"), "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr

    assert packs(store) == []  # the pack was never published: none of its blobs is visible
    assert not store.exists(hash_bytes(paths[0].read_bytes()))
    assert store.get_bytes(before) == b"stored before the crash"
    assert {b.digest for b in store.iter_blobs()} == {before}
    temp = list((Path(store.root) / "tmp").iterdir())
    assert [p.name[:5] for p in temp] == ["pack-"]
    assert store.sweep_temp() == 0  # young: it could belong to a writer still running
    assert store.sweep_temp(older_than_s=0) == 1

    puts = store.put_files([source(p) for p in paths])  # simply run again
    assert all(p.created for p in puts) and len(packs(store)) == 1
    assert store.get_bytes(puts[59].digest) == paths[59].read_bytes()


def test_a_large_file_is_chunked_and_an_edited_region_stores_only_its_chunks(
    store: BlobStore, tmp_path: Path
) -> None:
    size = CHUNKED_MIN_BYTES + 24 * 1024 * 1024
    content = bytearray(np.random.default_rng(7).bytes(size))
    big = tmp_path / "big.bin"
    big.write_bytes(content)
    [first] = store.put_files([source(big)])
    assert first.digest == blake3.blake3(content).hexdigest() and first.created
    assert store.size(first.digest) == size
    assert not list(Path(store.root).glob("??/??/*"))

    def stored_bytes() -> int:
        return sum(p.stat().st_size for p in (Path(store.root) / PACK_DIR).iterdir())

    before = stored_bytes()
    middle = size // 2
    content[middle : middle + 1024 * 1024] = np.random.default_rng(8).bytes(1024 * 1024)
    big.write_bytes(content)
    [second] = store.put_files([source(big)])
    assert second.digest == blake3.blake3(content).hexdigest() != first.digest
    assert stored_bytes() - before <= 2 * 1024 * 1024 + 64 * 1024  # a few chunks and a recipe

    assert b"".join(store.iter_chunks(second.digest)) == bytes(content)
    assert store.get_bytes(first.digest) != store.get_bytes(second.digest)
    assert store.verify(first.digest) and store.verify(second.digest)
    with store.open(second.digest) as fh:  # seekable across chunks
        fh.seek(middle - 10)
        assert fh.read(4096) == bytes(content[middle - 10 : middle + 4086])
        fh.seek(-5, os.SEEK_END)
        assert fh.read() == bytes(content[-5:])
    chunks = store.chunks_of({second.digest})
    assert len(chunks) > 10 and all(store.exists(c) for c in chunks)


def test_a_file_that_changes_while_stored_is_refused(store: BlobStore, tmp_path: Path) -> None:
    paths = small_files(tmp_path / "src", 20)
    listed = [source(p) for p in paths]
    with open(paths[12], "ab") as fh:  # written to after it was listed, before it is read
        fh.write(b"more")
    with pytest.raises(FileChangedError) as err:
        store.put_files(listed)
    assert err.value.http_status == 409 and "f0012.bin" in err.value.message
    assert packs(store) == []  # nothing of that batch was published

    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(9).bytes(CHUNKED_MIN_BYTES + 1))
    before = source(big)
    big.write_bytes(np.random.default_rng(10).bytes(CHUNKED_MIN_BYTES + 1))
    os.utime(big, ns=(before.mtime_ns, before.mtime_ns))  # same size and mtime: ctime moved
    with pytest.raises(FileChangedError):
        store.put_files([before])
    with pytest.raises(NotFoundError):
        store.size(blake3.blake3(big.read_bytes()).hexdigest())
